"""The launchers' command line, their rendezvous port and the CPU-ranks start-up shim (no training)."""
import os
import subprocess
import sys

import pytest

from common import REPO, free_port
from polar_xtuner.train import launch
from polar_xtuner.train.launch import LaunchError, command, ensure_rendezvous_env

CONFIG = os.path.join(REPO, "configs", "POLAR_tiny_full_varlenattn_demo.py")


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_prefix(cmd):
    """The variables of the command's leading ``env`` (empty without one), and the rest."""
    if cmd[0] != "env":
        return {}, cmd
    i = 1
    while "=" in cmd[i]:
        i += 1
    return dict(a.split("=", 1) for a in cmd[1:i]), cmd[i:]


def test_one_process_runs_xtuner_train_py_directly_on_a_free_port():
    variables, cmd = _env_prefix(command([CONFIG, "--deepspeed", "x.json"], env={}))
    assert cmd[0] == sys.executable and cmd[1].endswith(os.path.join("xtuner", "tools", "train.py"))
    assert cmd[2:] == [CONFIG, "--deepspeed", "x.json"]
    # all five, or DeepSpeed's MPI discovery would reset the port to 29500
    assert set(variables) == set(RENDEZVOUS)
    assert (variables["MASTER_ADDR"], variables["RANK"], variables["WORLD_SIZE"], variables["LOCAL_RANK"]) == \
        ("127.0.0.1", "0", "1", "0")
    assert launch.port_is_free(int(variables["MASTER_PORT"]))


def test_one_process_uses_port_or_master_port_when_free_and_respects_a_full_rendezvous():
    port = free_port()
    for env in ({"PORT": str(port)}, {"MASTER_PORT": str(port)}, {"PORT": str(port), "MASTER_PORT": "1"}):
        assert _env_prefix(command([CONFIG], env=env))[0]["MASTER_PORT"] == str(port)
    # MASTER_PORT and RANK already set (by the user or an outer launcher): left to them
    cmd = command([CONFIG], env={"MASTER_PORT": "1", "RANK": "0"})
    assert cmd[0] == sys.executable


def test_one_node_several_processes_get_a_free_port_or_a_free_port_they_named():
    cmd = command([CONFIG], env={"NPROC_PER_NODE": "2"})
    assert cmd[0] == "torchrun"
    port = int(next(a for a in cmd if a.startswith("--master_port=")).split("=")[1])
    assert launch.port_is_free(port)
    named = free_port()
    cmd = command([CONFIG], env={"NPROC_PER_NODE": "2", "PORT": str(named)})
    assert f"--master_port={named}" in cmd and "--master_addr=127.0.0.1" in cmd


@pytest.mark.parametrize("env", [{}, {"NPROC_PER_NODE": "2"}])
def test_a_taken_port_is_refused_with_one_line_naming_it(env, taken_port, capsys):
    assert launch.main([CONFIG]) == 0  # the config itself is fine
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**env, "PORT": str(taken_port)}.items():
            mp.setenv(name, value)
        assert launch.main([CONFIG]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: PORT {taken_port} is taken on this machine") and "leave it unset" in err


def test_a_taken_master_port_is_refused_for_one_process(taken_port):
    with pytest.raises(LaunchError, match=f"MASTER_PORT {taken_port} is taken on this machine"):
        command([CONFIG], env={"MASTER_PORT": str(taken_port)})


def test_multi_node_checks_port_on_node_0_only(taken_port):
    env = {"NNODES": "2", "ADDR": "10.0.0.1", "PORT": str(taken_port)}
    with pytest.raises(LaunchError, match=f"PORT {taken_port} is taken on this node .*the same on every node"):
        command([CONFIG], env={**env, "NODE_RANK": "0"})
    # node 1 connects to node 0's port; whatever listens on this machine's is not its concern
    assert f"--master_port={taken_port}" in command([CONFIG], env={**env, "NODE_RANK": "1"})
    # across nodes the default stays 29500 (the nodes must agree without talking)
    assert f"--master_port={launch.DEFAULT_PORT}" in command([CONFIG], env={"NNODES": "2", "NODE_RANK": "1"})


TRAIN_PY = os.path.join("site-packages", "xtuner", "tools", "train.py")


def test_ensure_rendezvous_env_fills_a_plain_single_process_only():
    env = {}
    added = ensure_rendezvous_env(env)
    assert env == added and set(added) == set(RENDEZVOUS) and launch.port_is_free(int(env["MASTER_PORT"]))
    assert (env["MASTER_ADDR"], env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("127.0.0.1", "0", "1", "0")
    # xtuner's train.py sets LOCAL_RANK=0 itself; a MASTER_PORT the user set is kept
    env = {"LOCAL_RANK": "0", "MASTER_PORT": "1234"}
    assert set(ensure_rendezvous_env(env)) == {"MASTER_ADDR", "RANK", "WORLD_SIZE"}
    assert env["MASTER_PORT"] == "1234"
    # torchrun, DeepSpeed's launcher, mpirun or srun with several tasks: untouched
    for env in ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29600"}, {"WORLD_SIZE": "2"},
                {"OMPI_COMM_WORLD_SIZE": "4"}, {"PMI_SIZE": "2"}, {"SLURM_STEP_NUM_TASKS": "8"}):
        before = dict(env)
        assert ensure_rendezvous_env(env) == {} and env == before


def test_ensure_rendezvous_env_acts_only_in_xtuners_train_py():
    assert ensure_rendezvous_env({}, program=os.path.join("x", "bin", "pytest")) == {}
    assert set(ensure_rendezvous_env({}, program=os.path.join("/venv", TRAIN_PY))) == set(RENDEZVOUS)
    before = dict(os.environ)
    assert ensure_rendezvous_env() == {}  # this process is pytest: importing the model changes nothing
    assert dict(os.environ) == before


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
        variables, _ = _env_prefix(cmd)  # one env prefix: the rendezvous and the unpickling setting
        assert variables["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "MASTER_PORT" in variables
        assert cmd.count("env") == 1
        i = cmd.index("--resume")
        assert cmd[i + 1] == str(ckpt) and "auto" not in cmd and "--resume=auto" not in cmd
    (work / "last_checkpoint").write_text(str(work / "gone.pth"))
    with pytest.raises(LaunchError, match="gone.pth, which does not exist"):
        command([CONFIG, "--work-dir", str(work), "--resume", "auto"], env={})


def test_default_work_dir_is_xtuners():
    assert launch.work_dir_of("configs/a/b.py", []) == os.path.join("work_dirs", "b")
    assert launch.work_dir_of("b.py", ["--work-dir=x"]) == "x"


def test_main_prints_nul_separated_command_or_exits_2(capsys):
    assert issubclass(LaunchError, launch.UserError)
    assert launch.main([CONFIG]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\0") and _env_prefix(out.split("\0")[:-1])[1][2] == CONFIG
    assert launch.main(["missing.py"]) == 2
    assert capsys.readouterr().err == "error: config missing.py: no such file\n"
    assert launch.main(["--port", "NO_SUCH_VARIABLE_HERE"]) == 0
    assert launch.port_is_free(int(capsys.readouterr().out))


def _init_dist_on_cpu(how: str):
    """init_dist as a torchrun worker would call it, in a fresh CPU-only interpreter.

    how: "none" (LOCAL_RANK appears only after start-up, so the .pth stays inert),
    "install" (calls cpu_ranks.install()), "pth" (LOCAL_RANK at start-up: the .pth acts).
    """
    code = (
        "import os\n"
        "os.environ['LOCAL_RANK'] = '0'\n"
        + ("from polar_xtuner.train import cpu_ranks; cpu_ranks.install()\n" if how == "install" else "")
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
    import torch

    if not torch.cuda.is_available():  # the failure the shim exists for happens on CPU-only machines
        proc = _init_dist_on_cpu("none")
        assert proc.returncode != 0 and "NVIDIA driver" in proc.stderr, proc.stderr[-2000:]
    proc = _init_dist_on_cpu("install")
    assert proc.returncode == 0 and "world 1 gloo" in proc.stdout, proc.stderr[-2000:]


def test_startup_file_installs_acts_at_startup_and_uninstalls(tmp_path, monkeypatch, capsys):
    """`python -m polar_xtuner.cpu_ranks --install` (what `make setup` runs) writes a .pth that shims init_dist."""
    from polar_xtuner.train import cpu_ranks

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    target = site_dir / cpu_ranks.PTH_NAME
    monkeypatch.setattr(cpu_ranks, "pth_path", lambda: str(target))
    assert cpu_ranks.main(["--install"]) == 0
    assert target.read_text() == cpu_ranks.PTH_LINE
    # a fresh interpreter that processes the directory's .pth files as start-up does, with LOCAL_RANK set
    code = (f"import site; site.addsitedir({str(site_dir)!r})\n"
            "from mmengine.dist.utils import init_dist\n"
            "import torch.distributed as dist\n"
            "init_dist('pytorch', backend='gloo')\n"
            "print('world', dist.get_world_size(), dist.get_backend())\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "world 1 gloo" in proc.stdout, proc.stderr[-2000:]
    assert cpu_ranks.main(["--uninstall"]) == 0 and not target.exists()
    assert cpu_ranks.main(["--uninstall"]) == 0  # nothing left to remove: still fine


def test_shim_is_inert_outside_torchrun_and_idempotent():
    from polar_xtuner.train import cpu_ranks

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


def test_cpu_ranks_make_deepspeed_async_gathers_complete(monkeypatch):
    """ZeRO-3 waits only for its last async all-gather; on gloo each runs on its own thread (DeepSpeed#8539)."""
    import types

    from polar_xtuner.train import cpu_ranks

    monkeypatch.setattr(cpu_ranks, "_cuda", lambda: False)  # as on a CPU rank, whatever this machine has

    waits = []

    class Work:
        def wait(self):
            waits.append(1)

    comm = types.ModuleType(cpu_ranks.DS_COMM)
    for name in cpu_ranks.DS_GATHERS:
        setattr(comm, name, lambda *a, async_op=False, **kw: Work() if async_op else None)
    cpu_ranks.patch(comm)
    cpu_ranks.patch(comm)  # idempotent: one wrapper
    assert comm.all_gather_into_tensor(0, 1, async_op=True) is not None and waits == [1]
    assert comm.allgather_fn(0, 1, group=None, async_op=True) is not None and waits == [1, 1]
    assert comm.all_gather([0], 1) is None and waits == [1, 1]  # a synchronous call is left alone
    # with CUDA, one stream orders the gathers: DeepSpeed's functions stay as they are
    monkeypatch.setattr(cpu_ranks, "_cuda", lambda: True)
    gpu = types.ModuleType(cpu_ranks.DS_COMM)
    gpu.all_gather = original = lambda *a, **kw: None
    cpu_ranks.patch(gpu)
    assert gpu.all_gather is original


def test_the_xtuner_cli_starts_train_py_without_importing_it(monkeypatch):
    """`xtuner train`'s own process gets tools/train.py's path without its imports (~4 s of CPU a run).

    xtuner's CLI asks ``from xtuner.tools import train`` only for ``train.__file__``; the
    start-up file registers the module by that path, which is the real script's.
    """
    import importlib.util

    monkeypatch.setitem(sys.modules, "xtuner.tools.train", None)  # whatever was there comes back after
    del sys.modules["xtuner.tools.train"]
    for argv in (["python", "-c"], ["/venv/bin/xtuner", "chat"], ["/venv/bin/xtuner"], ["/venv/bin/not-xtuner", "train"]):
        assert launch.lighten_xtuner_cli(argv) is False and "xtuner.tools.train" not in sys.modules, argv
    heavy = "mmengine.runner" in sys.modules
    assert launch.lighten_xtuner_cli(["/venv/bin/xtuner", "train", "cfg.py", "--deepspeed", "x"]) is True
    from xtuner.tools import train  # what xtuner's entry_point.train() runs

    real = os.path.join(os.path.dirname(importlib.util.find_spec("xtuner").origin), "tools", "train.py")
    assert train.__file__ == real and os.path.isfile(real)
    assert ("mmengine.runner" in sys.modules) == heavy  # nothing imported for it
    assert launch.lighten_xtuner_cli(["/venv/bin/xtuner", "train"]) is False  # registered once
