import pytest

from apexq.replay_server.rate_limiter import RateLimiterError, SampleToInsertRatio


# need = (sample batch 256 + insert block 32 * spi) / 2, by hand
@pytest.mark.parametrize(
    "spi, min_size, buf, need", [(8.0, 1000, 20000.0, 256.0), (0.5, 1, 1000.0, 136.0), (1.0, 10, 300.0, 144.0)]
)
def test_valid_settings_pass_down_to_the_smallest_buffer_that_cannot_deadlock(spi, min_size, buf, need):
    lim = SampleToInsertRatio(spi, min_size, buf)
    lim.check_progress(sample_batch=256, insert_batch=32)
    assert (lim.inserts, lim.samples, lim.diff) == (0, 0, 0)
    SampleToInsertRatio(spi, min_size, need).check_progress(sample_batch=256, insert_batch=32)
    with pytest.raises(RateLimiterError, match=f"at least {need:g} "):
        SampleToInsertRatio(spi, min_size, need - 0.5).check_progress(sample_batch=256, insert_batch=32)


@pytest.mark.parametrize(
    "spi, min_size, buf, word",
    [
        (0.0, 10, 100.0, "samples_per_insert"),
        (-1.0, 10, 100.0, "samples_per_insert"),
        (1.0, 0, 100.0, "min_size_to_sample"),
        (1.0, 10, 0.0, "error_buffer"),
    ],
)
def test_invalid_settings(spi, min_size, buf, word):
    with pytest.raises(RateLimiterError, match=word):
        SampleToInsertRatio(spi, min_size, buf)


def test_deadlocking_setting_says_why():
    lim = SampleToInsertRatio(8.0, 100, 1000.0)
    with pytest.raises(RateLimiterError) as err:
        lim.check_progress(sample_batch=256, insert_batch=256)  # needs (256 + 256*8)/2 = 1152
    assert "deadlock" in str(err.value) and "1152" in str(err.value)
    SampleToInsertRatio(8.0, 100, 1152.0).check_progress(256, 256)


def test_ratio_is_enforced():
    lim = SampleToInsertRatio(2.0, 10, 20.0)
    assert not lim.can_sample(4, size=5)  # below min size
    assert lim.can_insert(10, size=0)  # inserts always allowed below min size
    lim.record_insert(10)  # diff = 20
    assert lim.can_sample(40, size=10)  # 20 - 40 = -20 >= -20
    assert not lim.can_sample(41, size=10)
    assert not lim.can_insert(1, size=10)  # 20 + 2 > 20
    lim.record_sample(30)  # diff = -10
    assert lim.can_insert(15, size=10)  # -10 + 30 = 20 <= 20
    assert not lim.can_insert(16, size=10)


def test_no_deadlock_when_check_passes():
    # whenever inserting one block is refused, sampling one batch must be allowed
    lim = SampleToInsertRatio(4.0, 1, 50.0)
    lim.check_progress(sample_batch=20, insert_batch=20)
    for inserts in range(0, 200, 3):
        for samples in range(0, 1000, 7):
            lim.inserts, lim.samples = inserts, samples
            assert lim.can_insert(20, size=100) or lim.can_sample(20, size=100)
