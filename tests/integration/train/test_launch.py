"""The launch scripts (scripts/train*.sh, scripts/demo.sh) in their own processes: a taken port, missing environment, Slurm's variables."""
import os
import socket
import subprocess
import sys

import pytest

from common import REPO, run_tool
from polar_xtuner.constants import MKL_CBWR
from polar_xtuner.train import launch


pytestmark = pytest.mark.integration

CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")
SP_CONFIG = os.path.join(REPO, "configs", "POLAR_7B_full_varlenattn_sp4_custom_dataset.py")
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def test_launcher_and_demo_scripts_name_a_taken_port(taken_port, tmp_path):
    proc = run_tool("bash", "scripts/train.sh", CONFIG, env={"PORT": str(taken_port), "NPROC_PER_NODE": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: PORT {taken_port} is taken on this machine (another job?); "
                                         "set PORT to a free port, or leave it unset to get one"]
    proc = run_tool("bash", "scripts/demo.sh", env={"MASTER_PORT": str(taken_port), "DEMO_DIR": str(tmp_path / "d")})
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.splitlines() == [f"error: MASTER_PORT {taken_port} is taken on this machine (another "
                                         "job?); set MASTER_PORT to a free port, or leave it unset to get one"]
    assert not (tmp_path / "d").exists()


def test_launcher_scripts_name_missing_environment():
    proc = run_tool("bash", "scripts/train_multi_node.sh", CONFIG, env={"NNODES": "", "NODE_RANK": "", "ADDR": ""})
    assert proc.returncode != 0 and "set NNODES" in proc.stderr
    proc = run_tool("bash", "scripts/train_slurm.sh", CONFIG, env={"SLURM_JOB_NODELIST": ""})
    assert proc.returncode != 0 and "run inside a Slurm allocation" in proc.stderr
    proc = run_tool("bash", "scripts/train.sh", "missing.py")
    assert proc.returncode == 2 and "error: config missing.py: no such file" in proc.stderr


def test_slurm_launcher_maps_slurm_variables(tmp_path):
    """Fake srun/scontrol: srun runs its command as node 1; train.sh prints what it would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >&2\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    # a `python` that answers the launcher's question with `echo` + the environment it got
    (bin_dir / "python").write_text(
        "#!/bin/bash\nprintf 'echo\\0NNODES=%s\\0NODE_RANK=%s\\0ADDR=%s\\0PORT=%s\\0NPROC=%s\\0' "
        '"$NNODES" "$NODE_RANK" "$ADDR" "$PORT" "$NPROC_PER_NODE"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_SUBMIT_DIR": REPO, "PORT": "29555", "NPROC_PER_NODE": "", "ADDR": ""}
    proc = subprocess.run(["bash", "scripts/train_slurm.sh", CONFIG], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "srun --nodes=2 --ntasks-per-node=1" in proc.stderr
    assert proc.stdout.split() == ["NNODES=2", "NODE_RANK=1", "ADDR=node-a", "PORT=29555", "NPROC=8"]


def test_launcher_refuses_sequence_parallel_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine may run it")
    proc = run_tool("bash", "scripts/train.sh", SP_CONFIG, env={"NPROC_PER_NODE": "4"})
    assert proc.returncode == 2
    assert "runs on GPUs only" in proc.stderr and "sequence_parallel_size = 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plain_xtuner_train_process_gets_a_free_deepspeed_port_not_29500(tmp_path):
    """What `xtuner train` (one process) does: start xtuner's tools/train.py, then DeepSpeed's init.

    Without ensure_rendezvous_env, DeepSpeed's MPI discovery sets MASTER_PORT=29500, so a second
    run on the machine failed with EADDRINUSE (and xtuner's CLI still exited 0). The start-up file
    that make setup installs sets the port before the script's first line (no import does).
    """
    script = tmp_path / "xtuner" / "tools" / "train.py"
    script.parent.mkdir(parents=True)
    script.write_text(
        "import os\n"
        "os.environ.setdefault('LOCAL_RANK', '0')  # as xtuner's train.py does\n"
        "import sys\n"
        "assert not any(m.startswith('polar_xtuner.train.model') for m in sys.modules)\n"
        "from deepspeed import comm\n"
        "comm.init_distributed(dist_backend='gloo', verbose=False)\n"
        "print('ok', os.environ['MASTER_PORT'], comm.get_world_size(), os.environ['MKL_CBWR'])\n")
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS and k != "MKL_CBWR"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    holder = socket.socket()
    try:  # 29500 taken, as by another run (if something else holds it already, just as well)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", launch.DEFAULT_PORT))
        holder.listen()
    except OSError:
        pass
    try:
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    word, port, world, mkl = proc.stdout.split()[-4:]
    assert word == "ok" and port != str(launch.DEFAULT_PORT) and world == "1" and mkl == MKL_CBWR
