from trainers.run.events import STOP_REQUESTED, read_events
from trainers.run.stop_request import ask_to_stop, clear_stop_request, stop_requested


def test_ask_to_stop_records_who_asked_then_leaves_the_request(tmp_path):
    run = str(tmp_path)
    ask_to_stop(run, "stop requested by `kiln stop` (ada@trainer-1)", driver={"user": "ada"})
    ((_, event),) = read_events(run)
    assert event["kind"] == STOP_REQUESTED and event["driver"] == {"user": "ada"}
    assert stop_requested(run)["reason"] == "stop requested by `kiln stop` (ada@trainer-1)"
    clear_stop_request(run)
    assert stop_requested(run) is None


def test_a_prune_is_its_own_event_and_a_repeat_records_none(tmp_path):
    run = str(tmp_path)
    ask_to_stop(run, "pruned", event="pruned", step=4)
    ask_to_stop(run, "the sweep ended this trial early", event=None)
    assert [(e["kind"], e.get("step")) for _, e in read_events(run)] == [("pruned", 4)]
    assert stop_requested(run)["reason"] == "the sweep ended this trial early"
