"""serve.sh's launcher in-process: the engine commands, the model's dtype and length, the port check."""
import json
import os
import socket

import pytest

from polar_xtuner.encoding import EncodingSettings
from polar_xtuner.serve import launcher
from polar_xtuner.serve.launcher import ServeError, check_port, engine_command, model_dtype, model_max_length


def _model_dir(tmp_path, dtype="float32", max_length=None):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"torch_dtype": dtype}))
    if max_length:
        EncodingSettings(max_length, 128, 4).save(str(d))
    return str(d)


def _value(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_the_cpu_venv_is_the_repositorys():
    from common import REPO

    assert launcher.REPO == REPO and launcher.CPU_SERVE_VENV == os.path.join(REPO, ".venv-serve")


def test_vllm_gets_raw_scores_the_saved_dtype_and_the_trained_length(tmp_path):
    d = _model_dir(tmp_path, "bfloat16", max_length=1024)
    cmd = engine_command("vllm", d, "127.0.0.1", 30000, "/py", cpu=True)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert json.loads(_value(cmd, "--pooler-config")) == {"use_activation": False}  # no sigmoid
    assert _value(cmd, "--dtype") == "bfloat16" and _value(cmd, "--max-model-len") == "1024"
    assert _value(cmd, "--block-size") == str(launcher.CPU_BLOCK_SIZE) and _value(cmd, "--port") == "30000"


def test_extra_engine_arguments_win_where_they_overlap(tmp_path):
    d = _model_dir(tmp_path, "float32", max_length=1024)
    cmd = engine_command("vllm", d, "127.0.0.1", 1, "/py", extra=["--dtype=float16", "--max-model-len", "64"])
    assert "--dtype" not in cmd and cmd.count("--max-model-len") == 1
    assert cmd[-3:] == ["--dtype=float16", "--max-model-len", "64"]
    assert _value(engine_command("vllm", d, "h", 1, "/py", dtype="float16"), "--dtype") == "float16"


def test_sglang_and_lmdeploy_commands(tmp_path):
    d = _model_dir(tmp_path, "bfloat16")
    sg = engine_command("sglang", d, "0.0.0.0", 9, "/env/bin/python")
    assert "--is-embedding" in sg and _value(sg, "--model-path") == d and _value(sg, "--dtype") == "bfloat16"
    lm = engine_command("lmdeploy", d, "0.0.0.0", 9, "/env/bin/python")
    assert lm[0] == "/env/bin/lmdeploy" and lm[1:4] == ["serve", "api_server", d] and _value(lm, "--dtype") == "bfloat16"
    (tmp_path / "fp32").mkdir()
    with pytest.raises(ServeError, match="lmdeploy serves bfloat16 or float16 only"):
        engine_command("lmdeploy", _model_dir(tmp_path / "fp32", "float32"), "h", 1, "/py")
    with pytest.raises(ServeError, match="--engine must be one of"):
        engine_command("tgi", d, "h", 1, "/py")


def test_model_dir_faults_are_named(tmp_path):
    with pytest.raises(ServeError, match="not a converted model directory"):
        model_dtype(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ServeError, match="LoRA adapter directory"):
        model_dtype(str(tmp_path))
    d = _model_dir(tmp_path, "int8")
    with pytest.raises(ServeError, match="unsupported torch_dtype 'int8'"):
        model_dtype(d)


def test_max_length_comes_from_the_converters_file_only(tmp_path):
    assert model_max_length(_model_dir(tmp_path)) is None  # no polar_encoding.json: vLLM's own limit
    (tmp_path / "b").mkdir()
    assert model_max_length(_model_dir(tmp_path / "b", max_length=2048)) == 2048


def test_a_taken_port_is_refused_by_its_flag():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ServeError, match=f"--port {port}: 127.0.0.1:{port} is already in use"):
            check_port("127.0.0.1", port)
    finally:
        holder.close()
    check_port("127.0.0.1", port)  # free again
