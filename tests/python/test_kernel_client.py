"""The `deepscope` Jupyter kernel seen from jupyter_client: message signing,
errors and interrupts that keep the session's variables, a long run of
pipelined cells, restart, kernel_info and the heartbeat.

One kernel serves the whole module (starting one and building its first cell
takes seconds on a warm evcxr cache, minutes on a cold one); the restart test
comes last because it restarts that kernel.
"""
import json
import os
import struct
import time
import uuid
from queue import Empty

import pytest

pytest.importorskip("jupyter_client", reason="jupyter_client is not installed (make setup)")
import zmq  # noqa: E402  (pyzmq comes with jupyter_client)
from jupyter_client import KernelManager  # noqa: E402
from jupyter_client.session import DELIM, Session  # noqa: E402

pytestmark = pytest.mark.usefixtures("deepscope_kernelspec")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNEL_NAME = "deepscope"
FIRST_TIMEOUT = 600  # first cell of a kernel: evcxr may build its cache
TIMEOUT = 60  # any later cell
INTERRUPT_REPLY_WITHIN = 10  # seconds from interrupt_request to the cell's execute_reply


# --- helpers ---------------------------------------------------------------

class Run:
    """What one execute_request produced."""

    def __init__(self, msg_id, reply, outputs, others):
        self.msg_id = msg_id
        self.reply = reply  # the execute_reply message
        self.outputs = outputs  # iopub messages of this request between busy and idle (not status / execute_input)
        self.others = others  # iopub messages of other requests seen meanwhile

    @property
    def content(self):
        return self.reply["content"]

    def of_type(self, msg_type):
        return [m for m in self.outputs if m["msg_type"] == msg_type]

    def stdout(self):
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")

    def result(self, mime="text/plain"):
        results = self.of_type("execute_result")
        assert len(results) == 1, f"expected one execute_result, got {self.describe()}"
        return results[0]["content"]["data"][mime]

    def describe(self):
        shown = [(m["msg_type"], m["content"]) for m in self.outputs]
        return f"reply {self.content}\noutputs {json.dumps(shown, indent=1, default=str)[:4000]}"


def messages(get, timeout, missing):
    """Messages from `get` until `timeout` seconds pass; then AssertionError(missing())."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(missing())
        try:
            yield get(timeout=left)
        except Empty:
            continue


def wait_reply(kc, msg_id, timeout, channel="shell"):
    """The reply to `msg_id` (other replies, e.g. kernel_info from wait_for_ready, are skipped)."""
    get = kc.get_shell_msg if channel == "shell" else kc.get_control_msg
    for msg in messages(get, timeout, lambda: f"no {channel} reply to {msg_id} within {timeout} s"):
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def collect_iopub(kc, msg_id, timeout):
    """IOPub messages up to the `idle` status of `msg_id`: (ours, others)."""
    ours, others = [], []
    missing = lambda: f"no idle status for {msg_id} within {timeout} s; got {[m['msg_type'] for m in ours]}"  # noqa: E731
    for msg in messages(kc.get_iopub_msg, timeout, missing):
        if msg["parent_header"].get("msg_id") != msg_id:
            others.append(msg)
            continue
        if msg["msg_type"] == "status":
            if msg["content"]["execution_state"] == "idle":
                return ours, others
            continue
        if msg["msg_type"] != "execute_input":
            ours.append(msg)


def execute(kc, code, timeout=TIMEOUT, **kwargs):
    msg_id = kc.execute(code, allow_stdin=False, **kwargs)
    reply = wait_reply(kc, msg_id, timeout)
    outputs, others = collect_iopub(kc, msg_id, timeout)
    return Run(msg_id, reply, outputs, others)


def execute_ok(kc, code, timeout=TIMEOUT):
    run = execute(kc, code, timeout)
    assert run.content["status"] == "ok", f"cell failed:\n{code}\n{run.describe()}"
    return run


def execute_request_content(code):
    return {"code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}


def start_kernel():
    km = KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=FIRST_TIMEOUT)
        # the first cell starts evcxr and loads the library: allow for a cold build cache
        run = execute(kc, "1 + 1", timeout=FIRST_TIMEOUT)
        assert run.content["status"] == "ok", f"the first cell failed: {run.describe()}"
    except BaseException:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    return km, kc


@pytest.fixture(scope="module")
def kernel():
    km, kc = start_kernel()
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel()


def png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- tests -----------------------------------------------------------------

def test_install_writes_kernel_json_and_logos(deepscope_kernelspec):
    spec = json.loads((deepscope_kernelspec / "kernel.json").read_text())
    assert spec["display_name"] == "Rust (DeepScope)"
    assert spec["language"] == "rust"
    assert spec.get("interrupt_mode") == "message"
    assert "{connection_file}" in spec["argv"]
    assert os.path.isabs(spec["argv"][0]) and os.access(spec["argv"][0], os.X_OK), spec["argv"]
    assert "kernel" in spec["argv"]
    for size in (32, 64):
        assert png_size(deepscope_kernelspec / f"logo-{size}x{size}.png") == (size, size)
    if os.path.exists(os.path.join(ROOT, "kernelspec", "logo-svg.svg")):
        assert (deepscope_kernelspec / "logo-svg.svg").read_text().lstrip().startswith("<svg")


def test_kernel_info(kernel):
    km, kc = kernel
    msg_id = kc.kernel_info()
    info = wait_reply(kc, msg_id, TIMEOUT)["content"]
    assert info["status"] == "ok"
    major, minor = (int(x) for x in info["protocol_version"].split(".")[:2])
    assert (major, minor) >= (5, 3), info["protocol_version"]
    assert info["implementation"]
    assert info["language_info"]["name"] == "rust"
    assert info["language_info"]["file_extension"] == ".rs"
    assert info["banner"].strip()
    links = info["help_links"]
    assert links and all(link["text"] and link["url"].startswith("http") for link in links), links


def test_heartbeat(kernel):
    km, kc = kernel
    # the hb channel pings every time_to_dead (1 s); after a few rounds it still beats
    time.sleep(3 * kc.hb_channel.time_to_dead + 0.5)
    assert kc.hb_channel.is_beating()
    # and the hb socket echoes what it gets
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(f"{km.transport}://{km.ip}:{km.hb_port}")
        sock.send(b"deepscope-ping")
        assert sock.poll(5000), "no heartbeat echo within 5 s"
        assert sock.recv() == b"deepscope-ping"
    finally:
        sock.close()


def test_forged_execute_requests_are_never_executed(kernel, tmp_path):
    km, kc = kernel
    before = execute_ok(kc, "2 + 2").content["execution_count"]

    def forged(tag):
        target = tmp_path / f"forged-{tag}.txt"
        return target, f'std::fs::write(r#"{target}"#, "{tag}").unwrap();\nprintln!("FORGED {tag}");'

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"{km.transport}://{km.ip}:{km.shell_port}")
    targets, forged_ids = [], []
    try:
        # 1. signed with the wrong key
        target, code = forged("wrong-key")
        wrong = Session(key=b"not-the-kernel-key", signature_scheme=km.session.signature_scheme)
        msg = wrong.msg("execute_request", execute_request_content(code))
        wrong.send(sock, msg)
        targets.append(target)
        forged_ids.append(msg["header"]["msg_id"])

        # 2. no signature at all (empty HMAC frame)
        target, code = forged("unsigned")
        unsigned = Session(key=b"")
        msg = unsigned.msg("execute_request", execute_request_content(code))
        unsigned.send(sock, msg)
        targets.append(target)
        forged_ids.append(msg["header"]["msg_id"])

        # 3. the right key, but the content was swapped after signing
        target, code = forged("tampered")
        right = Session(key=km.session.key, signature_scheme=km.session.signature_scheme)
        msg = right.msg("execute_request", execute_request_content("3 + 3"))
        parts = right.serialize(msg)
        parts[parts.index(DELIM) + 5] = json.dumps(execute_request_content(code)).encode()
        sock.send_multipart(parts)
        targets.append(target)
        forged_ids.append(msg["header"]["msg_id"])

        # A properly signed request after them: the kernel handles shell
        # requests in order, so once it is answered the forged ones were seen.
        run = execute_ok(kc, 'println!("signed");')
        assert run.stdout() == "signed\n"
        assert run.content["execution_count"] == before + 1, "a forged request was counted as an execution"

        time.sleep(2)
        assert sock.poll(0) == 0, f"the kernel answered a forged request: {sock.recv_multipart()}"
    finally:
        sock.close()

    late = []
    while True:
        try:
            late.append(kc.get_iopub_msg(timeout=0.5))
        except Empty:
            break
    traffic = [m for m in run.others + late if m["parent_header"].get("msg_id") in forged_ids]
    assert not traffic, f"iopub traffic for forged requests: {[(m['msg_type'], m['content']) for m in traffic]}"
    for target in targets:
        assert not target.exists(), f"a forged request was executed: {target} exists"
    # the kernel still works
    assert execute_ok(kc, "6 * 7").result() == "42"


def test_compile_error(kernel):
    km, kc = kernel
    run = execute(kc, 'let n: i32 = "not a number";')
    assert run.content["status"] == "error", run.describe()
    assert run.content["ename"] == "CompileError"
    assert run.content["evalue"].strip()
    assert isinstance(run.content["traceback"], list) and run.content["traceback"]
    errors = run.of_type("error")
    assert len(errors) == 1 and errors[0]["content"]["ename"] == "CompileError", run.describe()


def test_cells_link_the_library_as_one_shared_object_and_show_values_as_before(kernel):
    km, kc = kernel
    # the runner maps the library once, as the dylib every cell links against
    maps = 'std::fs::read_to_string("/proc/self/maps")?.lines().filter(|l| l.ends_with("/libdeepscope.so")).count() > 0'
    assert execute_ok(kc, maps).result() == "true"
    # a cell's own shared object holds only the cell's code (it was ~6.6 MB
    # when every cell linked its own copy of the library)
    sizes = (r'std::fs::read_to_string("/proc/self/maps")?.lines().filter_map(|l| l.split_whitespace().nth(5))'
             r'.filter(|p| p.contains("/libcode_")).map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).max().unwrap_or(0)')
    assert 0 < int(execute_ok(kc, sizes).result()) < 2_000_000
    # final expressions: the Debug form of plain values, a type's own rich view, and
    # for a value with neither the same compile error as stock evcxr
    assert execute_ok(kc, 'Some(vec![1u8, 2])').result() == "Some([1, 2])"
    assert execute_ok(kc, '"text"').result() == '"text"'
    html = execute_ok(kc, 'Table::new(["a"])').result("text/html")
    assert "<table" in html
    run = execute(kc, "struct Opaque; Opaque")
    assert run.content["status"] == "error" and run.content["ename"] == "CompileError", run.describe()
    assert "Debug" in run.content["evalue"] or "Debug" in "".join(run.content["traceback"]), run.describe()


def test_a_bad_cell_setting_is_a_setup_error_that_names_it():
    km = KernelManager(kernel_name=KERNEL_NAME)
    km.start_kernel(env=dict(os.environ, DEEPSCOPE_CELL_LINKING="sideways"))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=FIRST_TIMEOUT)
        run = execute(kc, "1 + 1", timeout=FIRST_TIMEOUT)
        assert run.content["status"] == "error", run.describe()
        assert run.content["ename"] == "KernelSetupError", run.describe()
        assert "DEEPSCOPE_CELL_LINKING" in run.content["evalue"] and "sideways" in run.content["evalue"], run.describe()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_cells_opt_level_can_be_raised_and_the_model_still_runs(kernel):
    km, kc = kernel
    execute_ok(kc, ":opt 2")
    try:
        assert execute_ok(kc, "(1..=10u64).sum::<u64>()").result() == "55"
    finally:
        execute_ok(kc, ":opt 0")


def test_panic_keeps_earlier_variables(kernel):
    km, kc = kernel
    execute_ok(kc, "let keep = 41;")
    run = execute(kc, 'panic!("boom");')
    assert run.content["status"] == "error", run.describe()
    assert run.content["ename"] == "Panic", run.describe()
    assert "boom" in run.content["evalue"]
    errors = run.of_type("error")
    assert len(errors) == 1, run.describe()
    assert errors[0]["content"]["ename"] == "Panic" and "boom" in errors[0]["content"]["evalue"]
    assert execute_ok(kc, "keep + 1").result() == "42"


def test_cells_run_again_keep_their_variables_with_the_right_types(kernel):
    """A cell that redefines variables with types the session has compiled
    compiles while rust-analyzer types them (patched evcxr item 12); the values
    persist with the right types, and a type that cannot be stored is still
    refused before the cell runs, keeping the old value."""
    km, kc = kernel
    execute_ok(kc, "let model_rt = Model::load_default()?;")
    for text in ("Attention is all", "Routing"):
        execute_ok(kc, f'let t_rt = model_rt.trace("{text}")?; let n_rt = t_rt.logits.size()[1];')
        sizes = execute_ok(kc, "(t_rt.logits.size()[1], n_rt)").result()
        first, second = sizes.strip("()").split(", ")
        assert first == second and int(first) > 0, sizes
    # the same name now holds another type: stored with that type
    execute_ok(kc, 'let t_rt = "now a string";')
    assert execute_ok(kc, "t_rt.len()").result() == "12"
    execute_ok(kc, "let it_rt = 5u32;")
    run = execute(kc, "let it_rt = (0..3).map(|i| i * 2);")
    assert run.content["status"] == "error" and "cannot be persisted" in run.content["evalue"], run.describe()
    assert execute_ok(kc, "it_rt + 1").result() == "6"


def error_of(run):
    """The cell's error reply content, checked against its one `error` iopub message."""
    assert run.content["status"] == "error", run.describe()
    errors = run.of_type("error")
    assert len(errors) == 1, run.describe()
    for key in ("ename", "evalue", "traceback"):
        assert errors[0]["content"][key] == run.content[key], run.describe()
    return run.content


def test_question_mark_errors_are_error_replies_that_keep_earlier_values(kernel):
    km, kc = kernel
    execute_ok(kc, "let before = 41;")
    # a DeepScope error: its variant, its message, the values the cell lost
    run = execute(kc, 'let fresh = 5;\nlet m = Model::load("/nonexistent/ckpt", LoadOptions::default())?;\nprintln!("not reached");')
    err = error_of(run)
    assert err["ename"] in ("Io", "NoWeights", "Config"), err
    assert "/nonexistent/ckpt" in err["evalue"], err
    tb = "\n".join(err["traceback"])
    assert "\x1b[0;31m" in tb, f"no colour in the traceback: {tb!r}"
    assert "`fresh`" in tb and "`m`" in tb and "not stored" in tb, tb
    assert "not reached" not in run.stdout()
    # earlier values are kept; the failed cell's are not
    assert execute_ok(kc, "before + 1").result() == "42"
    assert execute(kc, "fresh").content["ename"] == "CompileError"

    # the library's checks on user input
    execute_ok(kc, 'let m = Model::load_default()?;\nlet t = m.trace("In the beginning")?;')
    err = error_of(execute(kc, "t.router_step(99, 0)?"))
    assert err["ename"] == "OutOfRange" and "layer 99 out of range" in err["evalue"], err
    err = error_of(execute(kc, "m.latent_spectra(999)?"))
    assert err["ename"] == "OutOfRange" and "999" in err["evalue"], err

    # errors of other types: std's, a string, a parse error, a boxed error with a cause
    err = error_of(execute(kc, 'std::fs::read("/nonexistent/file")?;'))
    assert err["ename"] == "io::Error" and "No such file" in err["evalue"], err
    err = error_of(execute(kc, 'Err::<(), _>("plain words")?;'))
    assert err["ename"] == "&str" and err["evalue"] == "plain words", err
    err = error_of(execute(kc, '"x".parse::<i32>()?;'))
    assert err["ename"] == "ParseIntError", err
    code = ('#[derive(Debug)]\nstruct LoadFailed(std::io::Error);\n'
            'impl std::fmt::Display for LoadFailed {\n'
            '    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result { write!(f, "loading the tokenizer failed") }\n}\n'
            'impl std::error::Error for LoadFailed {\n'
            '    fn source(&self) -> Option<&(dyn std::error::Error + \'static)> { Some(&self.0) }\n}\n'
            'let e: Box<dyn std::error::Error> = Box::new(LoadFailed(std::io::Error::other("the disk is on fire")));\n'
            'Err::<(), _>(e)?;')
    err = error_of(execute(kc, code))
    assert err["ename"] == "Box<dyn Error>" and err["evalue"] == "loading the tokenizer failed", err
    assert any("caused by: the disk is on fire" in line for line in err["traceback"]), err

    # `?` on a last expression still shows its rich display when it succeeds
    run = execute_ok(kc, "t.routing_map()?")
    data = run.of_type("execute_result")[0]["content"]["data"]
    assert "image/svg+xml" in data or "text/html" in data, run.describe()
    assert execute_ok(kc, "before").result() == "41"


def test_hooks_written_in_cells_run_in_the_pass_and_their_errors_are_error_replies(kernel):
    km, kc = kernel
    execute_ok(kc, "let hm = Model::load_default()?;")
    # a closure kept in a variable across cells, with state, run at every layer a glob chooses
    execute_ok(kc, "let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));\n"
                   "let log = seen.clone();\n"
                   'let halve = Interventions::new().hook("blocks.*.attn.hook_c_kv", move |ctx, x| {\n'
                   "    if let Ok(mut s) = log.lock() { s.push(ctx.point.to_string()); }\n"
                   "    Ok(x * 0.5)\n"
                   "});")
    run = execute_ok(kc, 'let ht = hm.trace_with("In the beginning", &Capture::default(), &halve)?;\n'
                         'println!("{:?}", seen.lock().map(|s| s.clone()).unwrap_or_default());')
    layers = int(execute_ok(kc, "hm.config.num_hidden_layers").result())
    assert all(f"blocks.{l}.attn.hook_c_kv" in run.stdout() for l in range(layers)), run.describe()
    base = execute_ok(kc, 'let hb = hm.trace("In the beginning")?;\ncompare(&hb, &ht)?.mean_kl > 0.0').result()
    assert base == "true"
    # a hook that returns the wrong shape: an error reply that names the point; the model stays
    err = error_of(execute(kc, 'hm.trace_with("In the beginning", &Capture::default(), '
                               '&Interventions::new().hook("blocks.1.hook_resid_post", |_c, x| Ok(x.narrow(1, 0, 1))))?'))
    assert err["ename"] == "HookShape" and "blocks.1.hook_resid_post" in err["evalue"] and "expected" in err["evalue"], err
    err = error_of(execute(kc, 'hm.trace_with("In the beginning", &Capture::default(), '
                               '&Interventions::new().hook("hook_embed", |_c, x| Ok(x.to_kind(Kind::Double))))?'))
    assert err["ename"] == "HookDtype" and "hook_embed" in err["evalue"] and "Double" in err["evalue"], err
    err = error_of(execute(kc, 'hm.trace_with("x", &Capture::default(), &Interventions::new().hook("blocks.*.hook_nothing", |_c, x| Ok(x)))?'))
    assert err["ename"] == "Input" and "matches no hook point" in err["evalue"], err
    # steering a generation is one call; its display says what was generated
    run = execute_ok(kc, "let v = Tensor::ones([hm.config.hidden_size as i64], (Kind::Float, Device::Cpu));\n"
                         'let g = hm.generate_with("In the beginning", &GenerateOptions::greedy(&hm, 5), &Capture::routing_only(), '
                         '&Interventions::new().add_vector_from("blocks.1.hook_resid_post", &v, 4))?;\ng')
    assert "new tokens after a" in run.result(), run.describe()
    assert "text/html" in run.of_type("execute_result")[0]["content"]["data"], run.describe()
    assert execute_ok(kc, "ht.seq_len() > 1").result() == "true"


def test_an_error_through_question_mark_stops_the_queued_cells(kernel):
    km, kc = kernel
    failing = kc.execute('Err::<(), _>("stop here")?;', allow_stdin=False, stop_on_error=True)
    queued = kc.execute('println!("queued");', allow_stdin=False)
    assert wait_reply(kc, failing, TIMEOUT)["content"]["status"] == "error"
    assert wait_reply(kc, queued, TIMEOUT)["content"]["status"] == "aborted"
    assert execute_ok(kc, "1 + 1").result() == "2"


def test_magics_say_what_to_run_first_and_take_a_trace_name(kernel):
    km, kc = kernel
    run = execute(kc, "%routing 1")
    assert run.content["status"] == "error", run.describe()
    assert run.content["ename"] == "MagicError", run.describe()
    assert "run `%trace TEXT` before `%routing`" in run.content["evalue"], run.content
    err = error_of(execute(kc, "%attention 0 no_such_trace"))
    assert "`no_such_trace` is not defined" in err["evalue"], err
    execute_ok(kc, 'let model = Model::load_default()?;\nlet t2 = model.trace("In the beginning God")?;')
    data = execute_ok(kc, "%routing 1 t2").of_type("execute_result")[0]["content"]["data"]
    assert "image/svg+xml" in data or "text/html" in data, data.keys()
    execute_ok(kc, "%trace And the earth")
    execute_ok(kc, "%routing")


def test_a_plotters_chart_renders_as_svg_through_the_kernel(kernel):
    km, kc = kernel
    code = """let fig = Figure::from_plotters(400, 240, |area| {
    use plotters::prelude::*;
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(area).caption("my own chart", ("sans-serif", 16))
        .x_label_area_size(20).y_label_area_size(30).build_cartesian_2d(0..4, 0.0..1.0)?;
    chart.configure_mesh().draw()?;
    chart.draw_series(LineSeries::new([(0, 0.1), (1, 0.7), (2, 0.4), (3, 0.9)], &BLUE))?;
    Ok(())
})?;
fig"""
    run = execute_ok(kc, code)
    data = run.of_type("execute_result")[0]["content"]["data"]
    svg = data.get("image/svg+xml", "")
    assert svg.lstrip().startswith("<svg") and "my own chart" in svg and "<polyline" in svg, run.describe()
    # a drawing that fails is an error reply naming the cause
    err = error_of(execute(kc, 'Figure::from_plotters(100, 100, |_| Err("no data for layer 7".into()))?'))
    assert err["ename"] == "PlotError" and "no data for layer 7" in err["evalue"], err


def test_comms(kernel):
    km, kc = kernel
    msg_id = kc.comm_info()
    reply = wait_reply(kc, msg_id, TIMEOUT)["content"]
    assert reply["status"] == "ok" and reply["comms"] == {}, reply

    comm_id = uuid.uuid4().hex
    msg = kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "deepscope-no-such-target", "data": {}})
    kc.shell_channel.send(msg)
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, "no comm_close for a comm_open to an unknown target"
        try:
            m = kc.get_iopub_msg(timeout=1)
        except Empty:
            continue
        if m["msg_type"] == "comm_close" and m["content"].get("comm_id") == comm_id:
            break
    assert execute_ok(kc, "1 + 2").result() == "3"


def test_progress_bar_updates_its_display(kernel):
    km, kc = kernel
    run = execute_ok(kc, 'let mut p = Progress::new("work", 4);\np.inc(1);\np.set(3);\np.finish();')
    shown = run.of_type("display_data")
    assert len(shown) == 1, run.describe()
    display_id = shown[0]["content"].get("transient", {}).get("display_id")
    assert display_id, f"the progress bar has no display_id: {shown[0]['content']}"
    updates = run.of_type("update_display_data")
    assert updates, run.describe()
    assert all(u["content"]["transient"]["display_id"] == display_id for u in updates)


def test_help_magic(kernel):
    km, kc = kernel
    run = execute_ok(kc, "%help")
    text = run.stdout()
    for m in run.of_type("display_data") + run.of_type("execute_result"):
        text += "".join(str(v) for v in m["content"]["data"].values())
    for magic in ("%model", "%trace", "%routing"):
        assert magic in text, f"%help does not mention {magic}: {text[:2000]}"


LONG_CELL = """\
println!("looping");
let _layers = model.config.num_hidden_layers;
loop {
    deepscope::kernel::cell::check_interrupt()?;
    std::thread::sleep(std::time::Duration::from_millis(10));
};"""


def test_interrupt_stops_a_long_cell_and_keeps_the_model(kernel):
    km, kc = kernel
    execute_ok(kc, "let model = Model::load_default()?;")
    msg_id = kc.execute(LONG_CELL, allow_stdin=False)
    # wait until the loop runs (the cell printed its first line)
    deadline = time.monotonic() + TIMEOUT
    seen = []
    while "looping" not in "".join(seen):
        assert time.monotonic() < deadline, "the long cell did not start"
        try:
            m = kc.get_iopub_msg(timeout=1)
        except Empty:
            continue
        if m["parent_header"].get("msg_id") == msg_id:
            assert m["msg_type"] != "error", f"the long cell failed: {m['content']}"
            if m["msg_type"] == "stream":
                seen.append(m["content"]["text"])
    time.sleep(0.5)

    started = time.monotonic()
    km.interrupt_kernel()
    reply = wait_reply(kc, msg_id, INTERRUPT_REPLY_WITHIN)
    took = time.monotonic() - started
    content = reply["content"]
    assert content["status"] == "error", content
    assert content["ename"] == "Interrupted", content
    assert took < INTERRUPT_REPLY_WITHIN
    outputs, _ = collect_iopub(kc, msg_id, TIMEOUT)
    assert [m["content"]["ename"] for m in outputs if m["msg_type"] == "error"] == ["Interrupted"]

    # the model survived the interrupt and still works
    assert execute_ok(kc, "model.config.num_hidden_layers").result().isdigit()
    n_tokens = execute_ok(kc, 'model.trace("In the beginning")?.seq_len()').result()
    assert int(n_tokens) > 0


N_CELLS = 500


@pytest.mark.slow
def test_500_pipelined_cells_print_every_line_once_in_order(kernel):
    km, kc = kernel
    first = execute_ok(kc, 'println!("start");').content["execution_count"]
    # send all requests first (the kernel queues them), then collect
    ids = [kc.execute(f'println!("line {i}");', allow_stdin=False) for i in range(N_CELLS)]
    index = {msg_id: i for i, msg_id in enumerate(ids)}

    replies = []  # (index, content) in arrival order
    streams = []  # (index, name, text) in arrival order
    idle = set()
    poller = zmq.Poller()
    poller.register(kc.shell_channel.socket, zmq.POLLIN)
    poller.register(kc.iopub_channel.socket, zmq.POLLIN)
    last_progress = time.monotonic()
    while len(replies) < N_CELLS or len(idle) < N_CELLS:
        if time.monotonic() - last_progress > TIMEOUT:
            raise AssertionError(f"stalled after {len(replies)} replies, {len(idle)} idle states")
        poller.poll(200)
        # drain iopub first: its queue must not overflow while the cells run
        while True:
            try:
                m = kc.iopub_channel.get_msg(timeout=0)
            except Empty:
                break
            i = index.get(m["parent_header"].get("msg_id"))
            if i is None:
                continue
            last_progress = time.monotonic()
            if m["msg_type"] == "stream":
                streams.append((i, m["content"]["name"], m["content"]["text"]))
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                idle.add(i)
            elif m["msg_type"] in ("error", "execute_result", "display_data"):
                streams.append((i, m["msg_type"], json.dumps(m["content"])))
        while True:
            try:
                m = kc.shell_channel.get_msg(timeout=0)
            except Empty:
                break
            i = index.get(m["parent_header"].get("msg_id"))
            if i is not None:
                replies.append((i, m["content"]))
                last_progress = time.monotonic()

    assert [i for i, _ in replies] == list(range(N_CELLS)), "execute_replies out of order"
    bad = [(i, c) for i, c in replies if c["status"] != "ok"]
    assert not bad, f"cells failed: {bad[:3]}"
    counts = [c["execution_count"] for _, c in replies]
    assert counts == list(range(first + 1, first + 1 + N_CELLS)), f"execution_count: {counts[:5]}...{counts[-5:]}"

    others = [s for s in streams if s[1] != "stdout"]
    assert not others, f"unexpected output: {others[:5]}"
    per_cell = {}
    for i, _, text in streams:
        per_cell[i] = per_cell.get(i, "") + text
    wrong = [(i, per_cell.get(i)) for i in range(N_CELLS) if per_cell.get(i) != f"line {i}\n"]
    assert not wrong, f"cells whose stdout is not exactly their line: {wrong[:5]}"
    order = [i for i, _, _ in streams]
    assert order == sorted(order), "stdout arrived out of order"
    text = "".join(t for _, _, t in streams)
    assert text.splitlines() == [f"line {i}" for i in range(N_CELLS)]


def test_restart_forgets_variables_and_counts_from_one(kernel):
    km, kc = kernel
    execute_ok(kc, "let r = 5;")
    assert execute_ok(kc, "r * 2").result() == "10"

    km.restart_kernel()
    kc.wait_for_ready(timeout=FIRST_TIMEOUT)
    run = execute(kc, "let fresh = 2 * 3;\nfresh", timeout=FIRST_TIMEOUT)
    assert run.content["status"] == "ok", run.describe()
    assert run.result() == "6"
    assert run.content["execution_count"] == 1
    assert run.of_type("execute_result")[0]["content"]["execution_count"] == 1

    run = execute(kc, "r")
    assert run.content["status"] == "error", f"`r` survived the restart: {run.describe()}"
    assert run.content["ename"] == "CompileError"
    assert "`r`" in run.content["evalue"] or "`r`" in "\n".join(run.content["traceback"]), run.describe()
    assert run.content.get("execution_count") == 2, run.describe()

    run = execute_ok(kc, "fresh + 1")
    assert run.result() == "7"
    assert run.content["execution_count"] == 3
