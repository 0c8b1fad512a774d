"""polar_xtuner/eval/plot.py: the plot is written in the format its extension names."""
import pytest



@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_the_plot_is_written_in_the_format_its_extension_names(ext, magic, tmp_path):
    from polar_xtuner.eval.plot import plot_scores
    from polar_xtuner.outputs import atomic_file

    path = tmp_path / f"scores{ext}"
    with atomic_file(str(path)) as tmp:  # as eval_pref writes it: the temporary name keeps the extension
        plot_scores([(1.0, 0.5), (0.2, 0.4), (0.9, -0.3)], tmp)
    assert path.read_bytes().startswith(magic)
