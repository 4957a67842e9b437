"""Jupyter widgets in the `deepscope` kernel, seen from jupyter_client as the
widget manager sees them: comm_open of `jupyter.widget` models with their full
state, comm_info, updates from the client reaching Rust callbacks, updates
from Rust reaching the client, request_state, comm_close, `interact` redrawing
its output, and bad messages that leave the kernel and the widgets working.

Also measures the time from a client's update to the redrawn output of an
`interact` (printed; the browser test measures slider-to-chart in JupyterLab).
"""
import time

import pytest

pytest.importorskip("jupyter_client", reason="jupyter_client is not installed (make setup)")

# `kernel`: the same module-scoped fixture (one kernel for this module)
from test_kernel_client import collect_iopub, execute, execute_ok, kernel, wait_reply  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("deepscope_kernelspec")

TIMEOUT = 60


def send_comm(kc, msg_type, content):
    """Sends a comm message on the shell channel; returns its iopub (ours, others) up to idle."""
    msg = kc.session.msg(msg_type, content)
    kc.shell_channel.send(msg)
    return collect_iopub(kc, msg["header"]["msg_id"], TIMEOUT)


def update(kc, comm_id, state):
    return send_comm(kc, "comm_msg", {"comm_id": comm_id, "data": {"method": "update", "state": state, "buffer_paths": []}})


def comm_info(kc, target=None):
    msg_id = kc.comm_info(target_name=target)
    return wait_reply(kc, msg_id, TIMEOUT)["content"]["comms"]


def opened(run):
    """comm_open contents by comm id, each with its message's `metadata` (where the
    widget manager reads the protocol version)."""
    return {m["content"]["comm_id"]: dict(m["content"], metadata=m["metadata"]) for m in run.of_type("comm_open")}


def stream(msgs, name):
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == name)


def updates(msgs, comm_id):
    return [m["content"]["data"] for m in msgs if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id]


def test_a_slider_opens_its_comms_and_displays_as_a_widget_view(kernel):
    _, kc = kernel
    run = execute_ok(kc, 'let k = widgets::IntSlider::new("top-k", 2, 1, 8)?;\nk.clone()')
    comms = opened(run)
    models = {c["data"]["state"]["_model_name"]: cid for cid, c in comms.items()}
    assert set(models) == {"LayoutModel", "SliderStyleModel", "IntSliderModel"}, comms
    for c in comms.values():
        assert c["target_name"] == "jupyter.widget"
        assert c["metadata"]["version"] == "2.1.0"
        assert c["data"]["buffer_paths"] == []
    slider = comms[models["IntSliderModel"]]["data"]["state"]
    assert (slider["value"], slider["min"], slider["max"], slider["description"]) == (2, 1, 8, "top-k")
    assert slider["_model_module"] == "@jupyter-widgets/controls" and slider["_model_module_version"] == "2.0.0"
    assert slider["layout"] == "IPY_MODEL_" + models["LayoutModel"]
    assert slider["style"] == "IPY_MODEL_" + models["SliderStyleModel"]
    view = run.result("application/vnd.jupyter.widget-view+json")
    assert view == {"version_major": 2, "version_minor": 0, "model_id": models["IntSliderModel"]}
    listed = comm_info(kc, "jupyter.widget")
    assert set(models.values()) <= set(listed), listed
    assert all(v["target_name"] == "jupyter.widget" for v in listed.values())
    assert comm_info(kc, "no.such.target") == {}


def slider_id(kc, var):
    run = execute_ok(kc, f"{var}.widget().id().to_string()")
    return run.result().strip('"')


def test_updates_from_the_client_reach_rust_callbacks_and_rust_updates_reach_the_client(kernel):
    _, kc = kernel
    execute_ok(kc, 'let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));\n'
                   '{ let seen = seen.clone(); k.on_change(move |v| { seen.lock().unwrap().push(v); println!("moved to {v}"); }); }')
    kid = slider_id(kc, "k")
    ours, _ = update(kc, kid, {"value": 5})
    assert "moved to 5" in stream(ours, "stdout"), ours
    assert execute_ok(kc, "seen.lock().unwrap().clone()").result() == "[5]"
    assert execute_ok(kc, "k.value()").result() == "5"
    # request_state: the whole state comes back as an update
    ours, _ = send_comm(kc, "comm_msg", {"comm_id": kid, "data": {"method": "request_state"}})
    [state] = updates(ours, kid)
    assert state["method"] == "update" and state["state"]["value"] == 5 and state["state"]["_model_name"] == "IntSliderModel"
    # from Rust: the client gets the changed key
    run = execute_ok(kc, "k.set_value(3)?;")
    assert {"method": "update", "state": {"value": 3}, "buffer_paths": []} in updates(run.outputs, kid)
    assert "moved to 3" in run.stdout()


def test_bad_messages_are_reported_and_leave_the_kernel_and_widgets_working(kernel):
    _, kc = kernel
    kid = slider_id(kc, "k")
    ours, _ = update(kc, "no-such-comm", {"value": 1})
    assert "no-such-comm" in stream(ours, "stderr") and "not open" in stream(ours, "stderr"), ours
    ours, _ = update(kc, kid, {"value": "three"})
    assert "expected an integer" in stream(ours, "stderr"), ours
    ours, _ = update(kc, kid, {"value": 99})
    assert "outside 1..=8" in stream(ours, "stderr"), ours
    ours, _ = send_comm(kc, "comm_msg", {"comm_id": kid, "data": {"method": "frobnicate"}})
    assert "unknown method" in stream(ours, "stderr"), ours
    assert execute_ok(kc, "k.value()").result() == "3"
    # a callback that panics: reported, and not charged to the next cell
    execute_ok(kc, 'let p = widgets::Checkbox::new("boom", false);\np.on_change(|v| if v { panic!("the callback panicked") });')
    ours, _ = update(kc, slider_id(kc, "p"), {"value": True})
    assert "the callback panicked" in stream(ours, "stderr"), ours
    run = execute(kc, "p.value()")
    assert run.content["status"] == "ok", run.describe()
    assert run.result() == "true"
    ours, _ = update(kc, kid, {"value": 4})
    assert "moved to 4" in stream(ours, "stdout"), ours


def test_interact_redraws_its_output_and_shows_errors_in_place(kernel):
    _, kc = kernel
    run = execute_ok(kc, 'let n = widgets::IntSlider::new("n", 2, 0, 9)?;\n'
                         'let view = interact(n.clone(), |n| -> Result<String> {\n'
                         '    if n == 0 { return Err(Error::Input("n must be positive".into())); }\n'
                         '    Ok(format!("n squared is {}", n * n))\n'
                         '})?;\nview.clone()')
    comms = opened(run)
    out_id = next(cid for cid, c in comms.items() if c["data"]["state"]["_model_name"] == "OutputModel")
    first = comms[out_id]["data"]["state"]["outputs"]
    box = next(c for c in comms.values() if c["data"]["state"]["_model_name"] == "VBoxModel")
    assert box["data"]["state"]["children"][-1] == "IPY_MODEL_" + out_id
    # the first drawing is in the output's state, or an update right after it opened
    drawn = first or updates(run.outputs, out_id)[-1]["state"]["outputs"]
    assert drawn[0]["data"]["text/plain"] == "n squared is 4", drawn
    nid = slider_id(kc, "n")
    took = []
    for value in (3, 7, 5, 8, 6):
        t = time.monotonic()
        ours, _ = update(kc, nid, {"value": value})
        took.append(time.monotonic() - t)
        [redrawn] = [u["state"]["outputs"] for u in updates(ours, out_id)]
        assert redrawn[0]["data"]["text/plain"] == f"n squared is {value * value}"
    ours, _ = update(kc, nid, {"value": 0})
    [err] = [u["state"]["outputs"] for u in updates(ours, out_id)]
    assert err[0]["output_type"] == "error" and err[0]["ename"] == "Input" and "n must be positive" in err[0]["evalue"]
    took.sort()
    print(f"\ninteract: client update to redrawn output, median {1000 * took[len(took) // 2]:.1f} ms "
          f"(min {1000 * took[0]:.1f}, max {1000 * took[-1]:.1f}) over {len(took)} updates")
    assert execute_ok(kc, "view.redraw_seconds().len()").result() == "7"


def test_comm_close_from_the_client_forgets_the_widget(kernel):
    _, kc = kernel
    execute_ok(kc, 'let gone = widgets::Text::new("t", "x");')
    gid = slider_id(kc, "gone")
    assert gid in comm_info(kc)
    send_comm(kc, "comm_close", {"comm_id": gid, "data": {}})
    assert gid not in comm_info(kc)
    ours, _ = update(kc, gid, {"value": "y"})
    assert "not open" in stream(ours, "stderr")
    # the Rust value still reads; other widgets still answer
    assert execute_ok(kc, "gone.value()").result() == '"x"'
    ours, _ = update(kc, slider_id(kc, "k"), {"value": 6})
    assert "moved to 6" in stream(ours, "stdout")


def test_a_runner_crash_closes_its_widgets_and_new_ones_work(kernel):
    _, kc = kernel
    execute_ok(kc, 'let c = widgets::Checkbox::new("c", false);')
    before = comm_info(kc)
    assert before
    run = execute(kc, "std::process::abort();")
    assert run.content["status"] == "error", run.describe()
    closed = {m["content"]["comm_id"] for m in run.of_type("comm_close")}
    assert closed == set(before), (closed, before)
    assert comm_info(kc) == {}
    # the restarted runner connects again with its first widget
    execute_ok(kc, 'let d = widgets::IntSlider::new("d", 1, 0, 3)?;\nd.on_change(|v| println!("d = {v}"));')
    ours, _ = update(kc, slider_id(kc, "d"), {"value": 2})
    assert "d = 2" in stream(ours, "stdout"), ours


def test_plain_comms_go_both_ways(kernel):
    _, kc = kernel
    execute_ok(kc, 'widgets::register_target("echo", |c: widgets::Comm, data: &widgets::Value| {\n'
                   '    c.send(widgets::json!({ "hello": data }));\n'
                   '    let back = c.clone();\n'
                   '    c.on_msg(move |d: &widgets::Value| back.send(widgets::json!({ "echo": d })));\n'
                   '});')
    # the client opens a comm to the registered target
    ours, _ = send_comm(kc, "comm_open", {"comm_id": "client-1", "target_name": "echo", "data": {"x": 1}})
    assert updates(ours, "client-1") == [{"hello": {"x": 1}}], ours
    assert comm_info(kc, "echo") == {"client-1": {"target_name": "echo"}}
    ours, _ = send_comm(kc, "comm_msg", {"comm_id": "client-1", "data": {"y": 2}})
    assert updates(ours, "client-1") == [{"echo": {"y": 2}}], ours
    send_comm(kc, "comm_close", {"comm_id": "client-1", "data": {}})
    assert comm_info(kc, "echo") == {}
    # no such target: closed at once
    ours, _ = send_comm(kc, "comm_open", {"comm_id": "client-2", "target_name": "nope", "data": {}})
    assert [m["content"]["comm_id"] for m in ours if m["msg_type"] == "comm_close"] == ["client-2"]
    # a target whose function refuses: closed, with the reason on stderr
    execute_ok(kc, 'widgets::register_target("picky", |_c: widgets::Comm, data: &widgets::Value| '
                   'if data["ok"] == true { Ok(()) } else { Err("ok must be true".to_string()) });')
    ours, _ = send_comm(kc, "comm_open", {"comm_id": "client-3", "target_name": "picky", "data": {}})
    assert [m["content"]["comm_id"] for m in ours if m["msg_type"] == "comm_close"] == ["client-3"]
    assert "ok must be true" in stream(ours, "stderr")
    assert "client-3" not in comm_info(kc)
    # the kernel side opens one to a frontend target
    run = execute_ok(kc, 'let to_front = widgets::Comm::open("my.frontend", widgets::json!({ "a": 1 }));\nto_front.id().to_string()')
    [opened_one] = run.of_type("comm_open")
    assert opened_one["content"]["target_name"] == "my.frontend" and opened_one["content"]["data"] == {"a": 1}
    assert opened_one["content"]["comm_id"] == run.result().strip('"')
