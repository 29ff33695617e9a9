"""The guest sampler's counting (the pausing itself runs in the PC's end-to-end boots)."""

from vmsuper.pc.sampler import BLOCK, Samples


def test_samples_are_counted_per_block_of_linear_address():
    samples = Samples()
    assert samples.summary() == "no guest samples"
    for _ in range(3):
        samples.add(0xF0000, 0xFDA1)  # real mode: CS base + IP
    samples.add(0, 0xEFDA6)  # the same block, flat 32-bit
    samples.add(0, 0x7C00)
    assert samples.total == 5
    assert samples.blocks[0xFFDA0 // BLOCK * BLOCK] == 3
    assert samples.blocks[0xEFDA0] == 1
    text = samples.summary(top=2)
    assert text.startswith("5 guest samples")
    assert "0xffda0 60%" in text and "0x7c00" not in text
