"""The launchers' command line and the CPU-ranks start-up shim (no training)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, run_tool
from polar_xtuner import launch
from polar_xtuner.launch import LaunchError, command

CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")


def test_one_process_runs_xtuner_train_py_directly():
    cmd = command([CONFIG, "--deepspeed", "x.json"], env={})
    assert cmd[0] == sys.executable and cmd[1].endswith(os.path.join("xtuner", "tools", "train.py"))
    assert cmd[2:] == [CONFIG, "--deepspeed", "x.json"]


def test_several_processes_use_torchrun_with_xtuners_variables():
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8", "ADDR": "10.0.0.1", "PORT": "29999"}
    cmd = command([CONFIG, "--work-dir", "w"], env=env)
    assert cmd[:6] == ["torchrun", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
                       "--master_addr=10.0.0.1", "--master_port=29999"]
    assert cmd[-5:] == [CONFIG, "--work-dir", "w", "--launcher", "pytorch"]


@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two' is not an integer"),
    ({"NNODES": "0"}, "NNODES=0 must be at least 1"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
])
def test_bad_environment_is_refused(env, message):
    with pytest.raises(LaunchError, match=message):
        command([CONFIG], env=env)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(LaunchError, match="no such file"):
        command([str(tmp_path / "missing.py")], env={})
    with pytest.raises(LaunchError, match="--launcher is set by the launcher"):
        command([CONFIG, "--launcher", "slurm"], env={})
    with pytest.raises(LaunchError, match="no such checkpoint"):
        command([CONFIG, "--resume", str(tmp_path / "nope.pth")], env={})


def test_resume_auto_uses_last_checkpoint_or_starts_fresh(tmp_path):
    work = tmp_path / "work"
    cmd = command([CONFIG, "--work-dir", str(work), "--resume", "auto"], env={})
    assert "--resume" not in cmd and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" not in cmd  # nothing to resume
    ckpt = work / "iter_20.pth"
    ckpt.mkdir(parents=True)
    (work / "last_checkpoint").write_text(str(ckpt))
    for args in (["--resume", "auto"], ["--resume=auto"]):
        cmd = command([CONFIG, "--work-dir", str(work), *args], env={})
        assert cmd[:2] == ["env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"]
        i = cmd.index("--resume")
        assert cmd[i + 1] == str(ckpt) and "auto" not in cmd and "--resume=auto" not in cmd
    (work / "last_checkpoint").write_text(str(work / "gone.pth"))
    with pytest.raises(LaunchError, match="gone.pth, which does not exist"):
        command([CONFIG, "--work-dir", str(work), "--resume", "auto"], env={})


def test_default_work_dir_is_xtuners():
    assert launch.work_dir_of("configs/a/b.py", []) == os.path.join("work_dirs", "b")
    assert launch.work_dir_of("b.py", ["--work-dir=x"]) == "x"


def test_main_prints_nul_separated_command_or_exits_2(capsys):
    assert launch.main([CONFIG]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\0") and out.split("\0")[2] == CONFIG
    assert launch.main(["missing.py"]) == 2
    assert "error: config missing.py: no such file" in capsys.readouterr().err


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


def _init_dist_on_cpu(how: str):
    """init_dist as a torchrun worker would call it, in a fresh CPU-only interpreter.

    how: "none" (LOCAL_RANK appears only after start-up, so the .pth stays inert),
    "install" (calls cpu_ranks.install()), "pth" (LOCAL_RANK at start-up: the .pth acts).
    """
    code = (
        "import os\n"
        "os.environ['LOCAL_RANK'] = '0'\n"
        + ("from polar_xtuner import cpu_ranks; cpu_ranks.install()\n" if how == "install" else "")
        + "from mmengine.dist.utils import init_dist\n"
        "import torch.distributed as dist\n"
        "init_dist('pytorch', backend='gloo')\n"
        "print('world', dist.get_world_size(), dist.get_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    env.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "CUDA_VISIBLE_DEVICES": ""})
    if how == "pth":
        env["LOCAL_RANK"] = "0"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_cpu_rank_init_fails_without_the_shim_and_works_with_it():
    proc = _init_dist_on_cpu("none")
    assert proc.returncode != 0 and "NVIDIA driver" in proc.stderr, proc.stderr[-2000:]
    proc = _init_dist_on_cpu("install")
    assert proc.returncode == 0 and "world 1 gloo" in proc.stdout, proc.stderr[-2000:]


def test_make_setup_installed_the_startup_file():
    from polar_xtuner import cpu_ranks

    assert open(cpu_ranks.pth_path()).read() == cpu_ranks.PTH_LINE
    proc = _init_dist_on_cpu("pth")
    assert proc.returncode == 0 and "world 1 gloo" in proc.stdout, proc.stderr[-2000:]


def test_shim_is_inert_outside_torchrun_and_idempotent():
    from polar_xtuner import cpu_ranks

    code = "import sys; import mmengine.dist.utils as u; print(getattr(u._init_dist_pytorch, 'polar_cpu_ranks', False))"
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    assert out.strip() == "False"  # the .pth line does nothing without LOCAL_RANK
    import mmengine.dist.utils as u

    original = u._init_dist_pytorch
    try:
        cpu_ranks.patch(u)
        once = u._init_dist_pytorch
        cpu_ranks.patch(u)
        assert u._init_dist_pytorch is once and once.__wrapped__ is original
    finally:
        u._init_dist_pytorch = original
