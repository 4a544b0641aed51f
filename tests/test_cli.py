"""Writing a run's outputs: all or nothing, with one clear error when the disk is full."""
import errno

import pytest

from qdrop_hf.tasks.cli import UserError, check_output_dir, write_outputs


def test_outputs_are_moved_in_only_when_everything_was_written(tmp_path):
    out = tmp_path / "out"
    write_outputs(out, {"quant": {"top1": 1.0}}, lambda folder: (folder / "model.safetensors").write_bytes(b"x"))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "results.json"]


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_while_saving_leaves_the_output_dir_as_it_was(tmp_path, existing):
    out = tmp_path / "out"
    if existing:  # an unfinished run's checkpoint, which must survive
        (out / "qdrop_checkpoint").mkdir(parents=True)

    def save(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="No space left on device"):
        write_outputs(out, {}, save)
    assert (sorted(p.name for p in out.iterdir()) == ["qdrop_checkpoint"]) if existing else not out.exists()


def test_output_dir_checks(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text("{}")
    with pytest.raises(UserError, match="not empty"):
        check_output_dir(str(tmp_path / "full"), overwrite=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        check_output_dir(str(tmp_path / "file"), overwrite=False)
    (tmp_path / "resume" / "qdrop_checkpoint").mkdir(parents=True)
    assert check_output_dir(str(tmp_path / "resume"), overwrite=False).exists()  # resumable
    check_output_dir(str(tmp_path / "resume"), overwrite=True)
    assert not (tmp_path / "resume" / "qdrop_checkpoint").exists()  # starts fresh
