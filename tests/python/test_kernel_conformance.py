"""The `deepscope` kernel against jupyter_kernel_test's protocol conformance
suite (every message is validated against the v5 message schemas).

jupyter_kernel_test 0.7 starts one kernel per class in setUpClass with a 60 s
startup timeout and waits 15 s per cell; the first DeepScope cell can take
minutes on a cold evcxr build cache, so setUpClass is overridden to start the
kernel with FIRST_TIMEOUT and run one warm-up cell, and later cells get TIMEOUT.
"""
import pytest

jkt = pytest.importorskip("jupyter_kernel_test", reason="jupyter_kernel_test is not installed (make setup)")
from jupyter_client.manager import start_new_kernel  # noqa: E402

FIRST_TIMEOUT = 900  # kernel start + warm-up cell
TIMEOUT = 60  # each later cell
ANALYZER_TIMEOUT = 180  # complete / inspect / is_complete: rust-analyzer's first request loads std

# test_inspect and test_kernel_info read the module's TIMEOUT (15 s) when they run
jkt.TIMEOUT = ANALYZER_TIMEOUT


@pytest.mark.usefixtures("deepscope_kernelspec")
class DeepScopeKernelTests(jkt.KernelTests):
    kernel_name = "deepscope"
    language_name = "rust"
    file_extension = ".rs"

    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("to stderr");'

    # rust-analyzer through evcxr: a binding made earlier in the same text
    # (the reply must hold exactly this match); the std method is checked in
    # test_completion_of_a_std_method below (several `to_*` methods match).
    completion_samples = [
        {"text": "let deepscope_sample_value = 1;\ndeepscope_sample_v", "matches": {"deepscope_sample_value"}},
        {"text": 'String::from("x").to_upp'},
    ]

    complete_code_samples = ["let x = 1;", "1+1"]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,"]
    invalid_code_samples = ["}", "let x = 1; )"]

    # a compile error: exactly one output message, the `error`
    code_generate_error = 'let n: i32 = "not a number";'

    code_execute_result = [
        {"code": "6*7", "result": "42"},
        {"code": "vec![1, 2, 3].len()", "result": "3"},
    ]

    code_display_data = [
        {"code": 'html("<b>hi</b>");', "mime": "text/html"},
        {"code": 'svg(r#"<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>"#);',
         "mime": "image/svg+xml"},
        {"code": 'markdown("**hi**");', "mime": "text/markdown"},
    ]

    # glob, matched against the whole input (like IPython): matches "6*7" only
    code_history_pattern = "6?7"
    supported_history_operations = ("tail", "range", "search")

    code_inspect_sample = "String"

    code_clear_output = "clear_output(false);"

    # code_page_something: DeepScope sends no pager payloads.

    @classmethod
    def setUpClass(cls):
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, startup_timeout=FIRST_TIMEOUT)
        try:
            msg_id = cls.kc.execute("1 + 1")
            while True:
                reply = cls.kc.get_shell_msg(timeout=FIRST_TIMEOUT)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            assert reply["content"]["status"] == "ok", f"warm-up cell failed: {reply['content']}"
            while True:
                msg = cls.kc.get_iopub_msg(timeout=TIMEOUT)
                if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"):
                    break
        except BaseException:
            cls.kc.stop_channels()
            cls.km.shutdown_kernel(now=True)
            raise

    def execute_helper(self, code, timeout=TIMEOUT, silent=False, store_history=True, stop_on_error=True):
        return super().execute_helper(code, timeout=timeout, silent=silent, store_history=store_history,
                                      stop_on_error=stop_on_error)

    def get_non_kernel_info_reply(self, timeout=None):
        # the base class waits forever for complete / is_complete replies
        return super().get_non_kernel_info_reply(timeout=ANALYZER_TIMEOUT if timeout is None else timeout)

    def test_completion_of_a_std_method(self):
        self.flush_channels()
        code = 'String::from("x").to_upp'
        msg_id = self.kc.complete(code)
        reply = self.get_non_kernel_info_reply()
        jkt.validate_message(reply, "complete_reply", msg_id)
        content = reply["content"]
        assert any(m.startswith("to_uppercase") for m in content["matches"]), content["matches"]
        assert code[content["cursor_start"]:content["cursor_end"]] == "to_upp", content

    def test_is_complete_indent(self):
        self.flush_channels()
        msg_id = self.kc.is_complete("fn f() {")
        reply = self.get_non_kernel_info_reply()
        jkt.validate_message(reply, "is_complete_reply", msg_id)
        assert reply["content"]["status"] == "incomplete"
        assert reply["content"]["indent"] == "    "

    def test_execute_result_of_a_rich_value_has_html(self):
        self.flush_channels()
        reply, output_msgs = self.execute_helper('let rich_trace = Model::load_default()?.trace("In the beginning")?;\nrich_trace')
        assert reply["content"]["status"] == "ok", reply["content"]
        results = [m for m in output_msgs if m["msg_type"] == "execute_result"]
        assert len(results) == 1, output_msgs
        assert {"text/plain", "text/html"} <= set(results[0]["content"]["data"])
