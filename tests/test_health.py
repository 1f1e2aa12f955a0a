"""run/health.py: the divergence guard's message names the last good checkpoint, or says that
none was written (a run that diverges before its first checkpoint)."""

from retinaperf.run.health import divergence_message

PARTS = {"bbox_regression": float("nan"), "classification": float("nan")}


def test_the_message_names_the_last_good_checkpoint():
    message = divergence_message(3, 3, 5, PARTS, 0.01, "step-00000002.pt")
    assert "at step 5: bbox_regression nan, classification nan, lr 0.01; " in message
    assert "; the last good checkpoint is step-00000002.pt: lower lr" in message


def test_without_a_checkpoint_it_says_none_was_written():
    message = divergence_message(21, 20, 60, PARTS, 0.00246, None)
    assert "(limit max_bad_steps=20); at step 60:" in message
    assert "lr 0.00246; no checkpoint was written: lower lr, raise clip_grad_norm" in message
    assert "checkpoint is" not in message
