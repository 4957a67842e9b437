"""Two DeepScope kernels at once each build in their own evcxr slot (a
locked directory), run cells, and keep working while the other does."""
import pytest

jupyter_client = pytest.importorskip("jupyter_client", reason="jupyter_client is not installed (make setup)")
from jupyter_client import KernelManager  # noqa: E402


def run(kc, code, timeout):
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: None, store_history=False)
    assert reply["content"]["status"] == "ok", reply["content"]
    return reply


def result(kc, code, timeout):
    out = []
    reply = kc.execute_interactive(code, timeout=timeout, store_history=False,
                                   output_hook=lambda m: out.append(m) if m["msg_type"] == "execute_result" else None)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert len(out) == 1, out
    return out[0]["content"]["data"]["text/plain"]


@pytest.mark.slow
def test_two_kernels_use_separate_build_slots(deepscope_kernelspec):
    kms, kcs = [], []
    try:
        for _ in range(2):
            km = KernelManager(kernel_name="deepscope")
            km.start_kernel()
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            kms.append(km)
            kcs.append(kc)
        # Both start building at once; the second one's slot is seeded from slot 0.
        slots = [result(kc, 'std::env::var("EVCXR_TMPDIR").unwrap()', timeout=900) for kc in kcs]
        assert slots[0] != slots[1], slots
        assert all("slot-" in s for s in slots), slots
        # Interleaved cells in both, each with its own state.
        run(kcs[0], "let who = 0;", timeout=120)
        run(kcs[1], "let who = 1;", timeout=120)
        for i, kc in enumerate(kcs):
            assert result(kc, "who * 10 + 1", timeout=120) == str(i * 10 + 1)
        # The library works in the second slot as well.
        assert result(kcs[1], 'Model::load_default()?.trace("In the beginning")?.seq_len()', timeout=300) == "4"
    finally:
        for kc in kcs:
            kc.stop_channels()
        for km in kms:
            km.shutdown_kernel(now=False)
