"""A trial's Ray Train callback costs its run's workers nothing to unpickle (issue 31, item 4).

Ray Train V2 sends the run's RunConfig, callbacks included, to every worker of the run, so each worker imports the
module of the trial's `ObjectiveReport` to unpickle it. When the class lived in tuning/trial.py (a Tune trial
process's module, which imports Ray Tune), every worker of every trial imported Ray Tune while its run started. Here a
fresh interpreter unpickles the callback as a worker would, with the slot runner's mailbox it forwards to, and must not
have imported Ray Tune, torch or MLflow on the way."""
import pickle
import subprocess
import sys

from forgetless.platform.tuning.objective import Objective
from forgetless.platform.tuning.objective_report import ObjectiveReport
from forgetless.platform.tuning.trial_runner import ReportMailbox


def test_unpickling_a_trials_callback_imports_neither_ray_tune_nor_the_driver_side():
    report = ObjectiveReport(Objective({"target/acc": 1.0}, 0.9), "trial-1", "forgetless-slots-x",
                             ReportMailbox(None, "trial-1"), in_host=True)
    unpickle = ("import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); "
                "print(type(r).__name__, type(r.forward).__name__, "
                "sorted(m for m in ('ray.tune', 'torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", unpickle], input=pickle.dumps(report), capture_output=True,
                         timeout=120, check=True).stdout.decode().strip()
    assert out == "ObjectiveReport ReportMailbox []", out
