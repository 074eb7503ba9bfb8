"""Checkpoint files read weights-only: what loads, what is refused (nothing of
it run), what counts as damage. Whole runs that resume from real DeepSpeed
checkpoints (a damaged one, a planted payload) are in test_train.py."""

import os

import pytest
import torch

from make_dist.errors import RefusedFile
from make_dist.train.engine import UnreadableCheckpoint, checkpoint_files, safe_load, verify_checkpoint


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def deepspeed_like_state():
    """What DeepSpeed's files hold: tensors, containers, and its four state types."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {"module": {"w": torch.ones(2, 3)}, "zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
            "param_slice_mappings": [{"w": fragment_address(numel=6, start=0)}], "ds_version": "0.19.8",
            "step": 4, "betas": (0.9, 0.98)}


def test_deepspeeds_state_types_load(tmp_path):
    torch.save(deepspeed_like_state(), tmp_path / "state.pt")
    state = safe_load(str(tmp_path / "state.pt"))
    assert state["step"] == 4 and torch.equal(state["module"]["w"], torch.ones(2, 3))
    assert state["loss_scaler"].cur_scale == 1.0


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_planted_object_is_refused_and_never_run(tmp_path, protocol):
    """torch.save's own protocol (2) names the object; 4 and 5 frame their
    opcodes, which the weights-only unpickler rejects before any object: both refused."""
    marker = tmp_path / "payload-ran"
    state = deepspeed_like_state()
    state["extra"] = Payload(marker)
    torch.save(state, tmp_path / "state.pt", pickle_protocol=protocol)
    with pytest.raises(RefusedFile) as refused:
        safe_load(str(tmp_path / "state.pt"))
    assert str(refused.value).startswith(f"{tmp_path}/state.pt holds ")
    said = "a Python object make-dist's checkpoints never hold (posix.system)" if protocol == 2 else \
        "pickled data beyond tensors, numbers and containers (Unsupported operand 149)"
    assert said in str(refused.value)
    assert not marker.exists()


class ByName:
    """Pickles as getattr(owner, name): how Python 3.11.2 (Debian 12's) pickles an
    Enum member, whatever Python runs the test."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


class OneArgument:
    def __reduce__(self):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        return getattr, (ZeroStageEnum,)


def test_an_enum_member_pickled_by_name_loads_and_nothing_else_so(tmp_path):
    """A checkpoint written under Python 3.11.2 holds DeepSpeed's ZeroStageEnum
    as getattr(ZeroStageEnum, 'gradients'): it loads (resuming failed on such
    a Python before). getattr on anything else is refused, nothing run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = deepspeed_like_state()
    state["zero_stage"] = ByName(ZeroStageEnum, "gradients")
    torch.save(state, tmp_path / "state.pt")
    assert safe_load(str(tmp_path / "state.pt"))["zero_stage"] is ZeroStageEnum.gradients
    for owner, name in ((ZeroStageEnum, "__class__"), (LossScaler, "__init__"), (ZeroStageEnum, "nothing")):
        state["zero_stage"] = ByName(owner, name)
        torch.save(state, tmp_path / "bad.pt")
        with pytest.raises(RefusedFile, match=rf"never hold \(getattr\({owner.__qualname__},'{name}'\)\)"):
            safe_load(str(tmp_path / "bad.pt"))
    state["zero_stage"] = OneArgument()
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(RefusedFile, match="never hold"):  # refused, not taken for damage
        safe_load(str(tmp_path / "bad.pt"))


def test_damage_is_told_apart_from_a_payload(tmp_path):
    torch.save(deepspeed_like_state(), tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "state").mkdir()
    for name, data in (("mp_rank_00_model_states.pt", whole[: len(whole) // 2]),  # truncated upload
                       ("zero_pp_rank_0_mp_rank_00_optim_states.pt", b"")):
        (tmp_path / "state" / name).write_bytes(data)
    with pytest.raises(UnreadableCheckpoint, match=r"mp_rank_00_model_states\.pt: RuntimeError: PytorchStreamReader"):
        verify_checkpoint(str(tmp_path), rank=0)
    with pytest.raises(UnreadableCheckpoint, match=r"no checkpoint files of rank 0"):
        verify_checkpoint(str(tmp_path / "elsewhere"), rank=0)


def test_each_rank_reads_its_own_files(tmp_path):
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    (tmp_path / "state").mkdir()
    for n in names:
        (tmp_path / "state" / n).write_bytes(b"")
    assert [os.path.basename(p) for p in checkpoint_files(str(tmp_path), 1)] == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert [os.path.basename(p) for p in checkpoint_files(str(tmp_path), 10)] == [
        "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
