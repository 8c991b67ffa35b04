"""With --json a command's stdout carries its JSON alone: what the process prints there while the command runs (Ray's
copies of its workers' stdout lines, Ray Tune's output with --verbose), from any thread, goes to stderr instead."""
import json
import subprocess
import sys
import textwrap


def test_prints_during_a_json_command_go_to_stderr_and_the_json_alone_to_stdout(tmp_path):
    script = textwrap.dedent("""
        import json, threading
        from forgetless.console import stdout_kept_for_results
        with stdout_kept_for_results(True):
            print("a worker's line, as Ray copies it")
            t = threading.Thread(target=lambda: print("Tune's experiment box"))
            t.start(); t.join()
        print(json.dumps({"result": 1}))
        with stdout_kept_for_results(False):
            print("without --json: stdout as usual")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first, rest = done.stdout.split("\n", 1)
    assert json.loads(first) == {"result": 1}
    assert rest == "without --json: stdout as usual\n"
    assert "a worker's line" in done.stderr and "Tune's experiment box" in done.stderr
