"""``du --tui``: the HTML report's tree (roots' exclusive bytes and shared groups → paths)
browsed on a terminal with curses: arrows move, Enter/→ opens, Backspace/← goes back,
``/`` searches labels, ``q`` quits."""

from __future__ import annotations

import curses


def _human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def _short(k: dict) -> str:
    """A root by its link's last two parts, a path by its name (the search sees the whole)."""
    label = k["label"]
    if k.get("kind") == "root":
        return "/".join(label.split("/")[-2:])
    if k.get("kind") == "path":
        return label.rsplit("/", 1)[-1][33:] or label
    return label


def browse(tree: dict) -> None:
    curses.wrapper(_main, tree)


def _main(scr, tree: dict) -> None:
    curses.curs_set(0)
    stack: list[tuple[dict, int]] = []
    node, sel, query = tree, 0, ""
    while True:
        kids = sorted(node.get("children", []), key=lambda c: -c["bytes"])
        if query:
            kids = [k for k in kids if query.lower() in k["label"].lower()] or kids
        h, w = scr.getmaxyx()
        scr.erase()
        title = " / ".join([n["label"] for n, _ in stack] + [node["label"]])
        scr.addnstr(0, 0, f"{title}  {_human(node['bytes'])}", w - 1, curses.A_BOLD)
        scr.addnstr(1, 0, "arrows: move  enter: open  backspace: back  /: search  q: quit"
                    + (f"  [search: {query}]" if query else ""), w - 1)
        sel = max(0, min(sel, len(kids) - 1))
        first = max(0, sel - (h - 4))
        for row, k in enumerate(kids[first:first + h - 3]):
            share = k["bytes"] / node["bytes"] if node["bytes"] else 0
            bar = "#" * int(share * 20)
            line = f"{_human(k['bytes']):>11} {bar:20} {_short(k)}"
            attr = curses.A_REVERSE if first + row == sel else curses.A_NORMAL
            scr.addnstr(3 + row, 0, line, w - 1, attr)
        scr.refresh()
        key = scr.getch()
        if key in (ord("q"), 27):
            return
        if key in (curses.KEY_DOWN, ord("j")):
            sel += 1
        elif key in (curses.KEY_UP, ord("k")):
            sel -= 1
        elif key in (curses.KEY_ENTER, 10, 13, curses.KEY_RIGHT, ord("l")):
            if kids and kids[sel].get("children"):
                stack.append((node, sel))
                node, sel, query = kids[sel], 0, ""
        elif key in (curses.KEY_BACKSPACE, 127, 8, curses.KEY_LEFT, ord("h")) and stack:
            node, sel = stack.pop()
            query = ""
        elif key == ord("/"):
            curses.echo()
            scr.addnstr(h - 1, 0, "search: ", w - 1)
            query = scr.getstr(h - 1, 8, 60).decode(errors="replace")
            curses.noecho()
            sel = 0
