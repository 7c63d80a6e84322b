"""README and docs/ as a newcomer reads them: what they name exists, and the
front page's "send one reading" example works as written.

Names checked: files and folders of the repository (links and backticked
paths), `bmsd` subcommands and their options, config keys written as
``[section] key``, and references from anywhere in the repository to a
section (``docs/<name>.md, "Heading"``, or README's), which must be a
heading or a bold label of that document.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import BaseModel

from bmsd.cli import build_parser
from bmsd.config import Config
from tools.localstack import free_port

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Top-level folders and files whose paths the documents name.
TOP = {p.name for p in REPO.iterdir() if not p.name.startswith(".")} | {".env.example"}


def _prose(text: str) -> str:
    """*text* without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _named_paths(document: Path) -> set[str]:
    text = document.read_text()
    found = set()
    for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://", "mailto:")):
            found.add(os.path.normpath(document.parent.relative_to(REPO) / target))
    for token in re.findall(r"`([^`\s]+)`", _prose(text)):
        token = token.rstrip(".,:;")
        head = token.split("/", 1)[0]
        if "/" in token and head in TOP and not re.search(r"[<>{}*…$:]|\.\.\.", token):
            found.add(token)
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_file_a_document_names_exists(document: Path) -> None:
    missing = sorted(p for p in _named_paths(document) if not (REPO / p).exists())
    assert missing == []


def _subcommands() -> dict[str, set[str]]:
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    choices: dict[str, object] = actions[0].choices  # type: ignore[attr-defined]
    return {name: {o for a in sub._actions for o in a.option_strings}  # type: ignore[attr-defined]
            for name, sub in choices.items()}


def _code(text: str) -> list[str]:
    """The document's code: each line of its shell blocks, and each inline code span."""
    lines = [line for block in re.findall(r"^```(?:sh|bash|console|shell)\n(.*?)^```", text,
                                          re.S | re.M)
             for line in block.splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", _prose(text))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_command_and_option_a_document_names_exists(document: Path) -> None:
    commands = _subcommands()
    wrong = []
    for code in _code(document.read_text()):
        code = code.split("#", 1)[0] if not code.lstrip().startswith("#") else ""
        for match in re.finditer(r"(?:^|[\s/;&(])bmsd ([a-z][a-z-]*)([^;&|]*)", code):
            name, rest = match[1], match[2]
            if name not in commands:
                wrong.append(f"bmsd {name}")
                continue
            for option in re.findall(r"(?:^|\s)(--[a-z][a-z-]*)", rest):
                if option not in commands[name] and option not in ("--help", "--version"):
                    wrong.append(f"bmsd {name} {option}")
    assert sorted(set(wrong)) == []


def _config_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for name, field in Config.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys[name] = set(model.model_fields)
    return keys


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_config_key_a_document_names_exists(document: Path) -> None:
    keys = _config_keys()
    wrong = []
    for section, names in re.findall(r"`?\[(\w+)\]`?((?: ?/? ?`?\w+`?)+)", document.read_text()):
        if section not in keys:
            if section in ("routes", "rules", "Service", "Unit", "Install", "metrics"):
                continue
            wrong.append(f"[{section}]")
            continue
        first = re.match(r" `?(\w+)`?", names)
        if first and first[1] not in keys[section] and not first[1][0].isupper():
            if first[1] in ("is", "the", "and", "or", "of", "in", "section", "table", "a",
                            "with", "its", "keys", "to", "as", "says", "names", "has", "for",
                            "user", "url", "key", "when", "on", "from", "no", "it", "if"):
                continue
            wrong.append(f"[{section}] {first[1]}")
    assert sorted(set(wrong)) == []


def _labels(document: Path) -> set[str]:
    text = document.read_text()
    found = {m[1].strip() for m in re.finditer(r"^#+ (.+)$", text, re.M)}
    found |= {m[1].strip().rstrip(".:") for m in re.finditer(r"\*\*([^*]+?)\*\*", text)}
    return found


def test_every_reference_to_a_section_finds_it() -> None:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    everywhere = set().union(*(_labels(d) for d in DOCUMENTS))
    wrong = []
    for name in listed:
        path = REPO / name
        if not path.is_file() or path.suffix in (".json", ".whl", ".png"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        text = re.sub(r"\s*\n\s*(?:#|--|//)?\s*", " ", text)  # a reference split over lines
        for document, section in re.findall(r"(README|docs/[\w-]+\.md), \"([^\"]+)\"", text):
            if document == "README":
                # Applied SQL scripts are never edited: their README references resolve
                # through the README's map to docs/.
                labels = everywhere if name.startswith("sql/") else _labels(REPO / "README.md")
            elif (REPO / document).exists():
                labels = _labels(REPO / document)
            else:
                labels = set()
            if not any(label == section or label.startswith(section) for label in labels):
                wrong.append(f"{name}: {document}, {section!r}")
    assert wrong == []


def test_the_front_page_stays_a_front_page() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


# --- "Send one reading and see it", run as written --------------------------------------


def test_send_one_reading_works_as_written(
    pg_server: object, pg_template: object, broker_factory: object, tmp_path: Path,
) -> None:
    """The README's block, run by bash, with only the servers' addresses changed: the
    test's PostgreSQL and a broker of the test's own (the shipped configuration, so
    logins are needed) instead of the default ports."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Send one reading and see it", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    script = block[1]
    admin = urlsplit(pg_server.admin_url)  # type: ignore[attr-defined]
    database = f"bmsd_readme_{os.getpid()}"
    broker = broker_factory()  # type: ignore[operator]
    db_url = urlunsplit(admin._replace(path=f"/{database}"))
    port = free_port()
    script = (script
              .replace("createdb bmsd", f"createdb -h {admin.hostname} -p {admin.port}"
                                        f" -U {admin.username} {database}")
              .replace("postgresql://127.0.0.1:5432/bmsd", db_url)
              .replace("-h 127.0.0.1 -p 1883", f"-h 127.0.0.1 -p {broker.port} -u tester"
                                               " -P tester-test-password"))
    if not pg_template.community:  # type: ignore[attr-defined]
        script = script.replace("bmsd migrate --database-url",
                                "bmsd migrate --skip-community-features --database-url")
    # bmsd run's defaults pointed at the same servers.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "BMSD_DATABASE_URL": db_url, "BMSD_MQTT_URL": broker.url,
           "BMSD_METRICS_ADDR": f"127.0.0.1:{port}", "BMSD_CONFIG": ""}
    env = {k: v for k, v in env.items() if v != "" or k != "BMSD_CONFIG"}
    run = subprocess.Popen(["bash", "-e", "-c", script + "\nkill %1; wait\n"], env=env,
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        pg_server.drop_database(database)  # type: ignore[attr-defined]
    assert "81.5" in out, out + err
    assert "(1 row)" in out, out + err
