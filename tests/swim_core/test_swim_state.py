"""The member table against a plain dict: puts, removes and the index order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from swim import Member, MemberState
from swim._state import MemberTable, SharedView

NAMES = ["a", "b", "c", "d", "e"]
STATES = list(MemberState)


def member(name: str, state: MemberState) -> Member:
    return Member(name=name, address=("10.0.0.1", 7946), incarnation=1, state=state, meta=b"")


steps = st.lists(
    st.tuples(st.sampled_from(["put", "remove"]), st.sampled_from(NAMES), st.sampled_from(STATES)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.booleans())
def test_table_matches_a_dict(script: list[tuple[str, str, MemberState]], shared: bool) -> None:
    base = [member("a", MemberState.ALIVE), member("b", MemberState.DEAD)] if shared else []
    table = MemberTable(SharedView(base))
    model = {m.name: m for m in base}
    for op, name, state in script:
        if op == "put":
            table.put(member(name, state))
            model[name] = member(name, state)
        else:
            removed = table.remove(name)
            in_base = any(m.name == name for m in base)
            assert removed == (name in model and not in_base)
            if removed:
                del model[name]
        assert len(table) == len(model)
        assert {m.name: m for m in table} == model
        # Every index names one member, each exactly once: probes and gossip
        # draw indices in [0, len).
        assert sorted(table.name_at(i) for i in range(len(table))) == sorted(model)
        assert table.live == sum(
            1 for m in model.values() if m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        )
        assert all(table.get(n) == model.get(n) for n in NAMES)
