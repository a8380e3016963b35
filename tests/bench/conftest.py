import pytest


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    """A small benchmark (8 fictitious + 4 real-world people, 6 extra identities, 24-pixel images)."""
    from surgery.bench.make_bench import make_bench
    out = tmp_path_factory.mktemp("bench") / "bench"
    make_bench(out, seed=5, people=8, forget_share=0.25, real_world=4, extra_people=6, tower_views=2, train_views=2,
               dev_views=1, test_views=1, image_size=24)
    return out
