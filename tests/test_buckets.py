"""Equal-area aspect buckets, checked against kohya-ss' published behaviour."""

from __future__ import annotations

from schemas.config import BucketConfig
from tasks.buckets import BucketAssigner, make_buckets


def test_sdxl_buckets_match_kohya():
    buckets = make_buckets(1024, 256, 2048, 64)
    assert len(buckets) == 41
    for wh in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536), (256, 2048)]:
        assert wh in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024
    near_equal = [w * h for w, h in buckets if max(w, h) < 2048]
    assert min(near_equal) / (1024 * 1024) > 0.9  # equal area but for the capped narrowest


def test_stage_one_base_area():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 for w, h in buckets)


def test_assignment_is_nearest_aspect_and_symmetric():
    assign = BucketAssigner(BucketConfig()).assign
    assert assign(1000, 1000) == (1024, 1024)
    assert assign(3000, 2000) == (1216, 832)  # 1.5 -> 1.46
    assert assign(2000, 3000) == (832, 1216)
    assert assign(10_000, 100) == (2048, 256)  # extreme ratios clamp to the widest bucket
    assert assign(855, 1083)[0] < assign(855, 1083)[1]


def test_assignment_agrees_with_brute_force():
    import math

    assigner = BucketAssigner(BucketConfig())
    for w in range(100, 3000, 37):
        for h in (97, 480, 1024, 2900):
            best = min(assigner.buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(w / h)))
            got = assigner.assign(w, h)

            def error(b, w=w, h=h):
                return abs(math.log(b[0] / b[1]) - math.log(w / h))

            assert error(got) <= error(best) + 1e-12
