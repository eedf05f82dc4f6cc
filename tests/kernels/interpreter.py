"""Running a test's kernel code under Triton's CPU interpreter: in a subprocess, since TRITON_INTERPRET must be set
before Triton is imported. Imported by the kernel test modules (this folder is on their path)."""
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def run_interpreted(code: str, timeout: int = 600) -> None:
    """Run `code` (indented as in the test) with TRITON_INTERPRET=1 and this folder on sys.path; it must print "ok"
    last. Fails the test with the end of the subprocess's stderr otherwise."""
    script = f"import sys\nsys.path.insert(0, {HERE!r})\n" + textwrap.dedent(code)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
