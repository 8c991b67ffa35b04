"""Orchestration: train loop + DeepSpeed engine, pre-training, tracking, metrics, storage, reports."""
