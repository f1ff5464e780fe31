"""README.md and docs/*.md against the code: every relative link resolves (file and anchor), and
every command they spell parses its flags (each `--name` is a flag of that command).

Fast: the command modules are imported and their flags defined into fresh `FlagValues`;
nothing is compiled or run.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import unicodedata

import pytest
from absl import flags

from cras_jax import console
from cras_jax.base import errors, schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)
LINKED = [*DOCS, os.path.join("tests", "README.md")]

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)((?:(?!\n\s*\n).)+?)\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']", re.I)
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# absl's own flags, and errors.define_verbose_flag's --verbose, which every command has
_STANDARD_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "verbosity", "v", "verbose"}


def _read(doc: str) -> str:
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    return f.read()


def _split_fences(text: str) -> tuple[list[str], list[list[str]]]:
  """The prose lines (fenced blocks blanked, so line numbers stay) and each fenced block's
  lines."""
  prose, blocks, block = [], [], None
  for line in text.splitlines():
    if _FENCE.match(line):
      if block is None:
        block = []
      else:
        blocks.append(block)
        block = None
      prose.append("")
    elif block is not None:
      block.append(line)
      prose.append("")
    else:
      prose.append(line)
  return prose, blocks


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: links and code marks dropped, lower case, punctuation
  removed except hyphens and underscores, each space a hyphen."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  # HTML tags go, but not inside code spans (`--target=tpu:<generation>` keeps its words)
  parts = re.split(r"(`+[^`]*`+)", text)
  text = "".join(p if p.startswith("`") else re.sub(r"<[^>]+>", "", p) for p in parts).lower()
  kept = []
  for ch in text:
    if ch in "-_ " or unicodedata.category(ch)[0] in "LN":
      kept.append(ch)
  return "".join(kept).replace(" ", "-")


@functools.cache
def anchors(doc: str) -> frozenset[str]:
  """The anchors a markdown file offers: its headings' slugs (repeats get -1, -2, ...) and
  explicit `<a id=...>` / `<a name=...>` anchors."""
  prose, _ = _split_fences(_read(doc))
  found, seen = set(), {}
  for line in prose:
    found.update(_HTML_ANCHOR.findall(line))
    m = _HEADING.match(line)
    if not m:
      continue
    base = slug(m.group(2))
    n = seen.get(base, 0)
    seen[base] = n + 1
    found.add(base if n == 0 else f"{base}-{n}")
  return frozenset(found)


def links(doc: str) -> list[tuple[int, str]]:
  """(line, target) of every markdown link outside code blocks and inline code."""
  prose, _ = _split_fences(_read(doc))
  text = _INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(prose))
  return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(text)]


@pytest.mark.parametrize("doc", LINKED)
def test_relative_links_resolve_to_files_and_headings(doc):
  problems = []
  for line, target in links(doc):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
      continue
    path, _, anchor = target.partition("#")
    where = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    if not os.path.exists(os.path.join(ROOT, where)):
      problems.append(f"{doc}:{line}: {target}: no file {where}")
    elif anchor and where.endswith(".md") and anchor not in anchors(where):
      problems.append(f"{doc}:{line}: {target}: no heading or anchor #{anchor} in {where}")
  assert not problems, "\n".join(problems)


def test_slugs_follow_github():
  assert slug("Parallelism: jit, shard_map, pmap") == "parallelism-jit-shard_map-pmap"
  assert slug("The scaling model (`python -m cras_jax.scaling`)") == (
      "the-scaling-model-python--m-cras_jaxscaling"
  )
  assert slug("Speed: against the authors' code") == "speed-against-the-authors-code"
  assert slug("3×3 patch — aggregation") == "33-patch--aggregation"
  assert slug("TPUs (`--target=tpu:<generation>`) <b>now</b>") == "tpus---targettpugeneration-now"


# --- command lines -------------------------------------------------------------------------


def _joined(lines: list[str]) -> list[str]:
  """Lines with backslash continuations joined."""
  out, pending = [], ""
  for line in lines:
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
    else:
      out.append(pending + line)
      pending = ""
  if pending:
    out.append(pending)
  return out


def _segments(line: str) -> list[list[str]]:
  """The simple commands of a shell line (split at ;, &&, ||, |), comments dropped."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  lexer.commenters = "#"
  try:
    tokens = list(lexer)
  except ValueError:  # an unbalanced quote: prose, not a command
    return []
  segments, current = [], []
  for token in tokens:
    if token and set(token) <= set(";&|"):
      segments.append(current)
      current = []
    else:
      current.append(token)
  segments.append(current)
  return [s for s in segments if s]


def command(tokens: list[str]) -> tuple[str, list[str]] | None:
  """(the module whose flags the command takes, its arguments) for `python -m cras_jax.X`,
  `cras-jax X`, `python -m tools.X` and `python tools/X.py`; None for any other command."""
  while tokens and (tokens[0] in ("$", "do", "then", "else", "time") or _ENV.match(tokens[0])):
    tokens = tokens[1:]
  if not tokens:
    return None
  if tokens[0] == "cras-jax":
    if len(tokens) == 1 or tokens[1] in ("--help", "-h", "help"):
      return "cras_jax.console", []
    name = tokens[1].replace("-", "_")
    if "<" in name:  # a placeholder: cras-jax <command>
      return None
    if name not in console.COMMANDS:
      return f"cras-jax {tokens[1]} (not a command)", tokens[2:]
    return "cras_jax." + console.module(name), tokens[2:]
  if tokens[0] not in ("python", "python3") or len(tokens) < 2:
    return None
  if tokens[1] == "-m" and len(tokens) > 2 and "<" not in tokens[2]:
    if tokens[2].startswith(("cras_jax.", "tools.")) or tokens[2] == "cras_jax":
      return tokens[2], tokens[3:]
    return None
  m = re.fullmatch(r"(?:\./)?tools/(\w+)\.py", tokens[1])
  return (f"tools.{m.group(1)}", tokens[2:]) if m else None


def command_lines(doc: str, fenced: bool = True) -> list[tuple[str, str, list[str]]]:
  """(shown line, module, arguments) of every command line in the fenced blocks of a
  document (or, with fenced=False, in its inline code spans)."""
  prose, blocks = _split_fences(_read(doc))
  if fenced:
    lines = [line for block in blocks for line in _joined(block)]
  else:
    text = "\n".join(prose)
    lines = [" ".join(m.group(2).split()) for m in _INLINE_CODE.finditer(text)]
  found = []
  for line in lines:
    for tokens in _segments(line):
      parsed = command(tokens)
      if parsed:
        found.append((line.strip(), *parsed))
  return found


def _define_flags_module(module: str) -> str | None:
  """The module whose `define_flags` defines a command's flags: the command module's own, or
  the one its `__main__` block calls (`X.define_flags()` or `command.run(X)`, X imported from a
  sub-package)."""
  spec = importlib.util.find_spec(module)
  with open(spec.origin, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  if any(isinstance(n, ast.FunctionDef) and n.name == "define_flags" for n in tree.body):
    return module
  imported = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  for node in ast.walk(tree):
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "define_flags"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in imported
    ):
      return imported[node.func.value.id]
    if (  # `command.run(X)`: X's define_flags (cras_jax/base/command.py)
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and isinstance(node.func.value, ast.Name)
        and imported.get(node.func.value.id) == "cras_jax.base.command"
        and node.args
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id in imported
    ):
      return imported[node.args[0].id]
  return None


def _argparse_flags(module: str) -> set[str]:
  """The options of a command that parses with argparse in its `main(argv)`: the parser is
  caught as it parses (nothing runs)."""

  class Caught(Exception):
    pass

  parsers = []

  def catch(self, *args, **kwargs):
    parsers.append(self)
    raise Caught

  original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
  argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = catch
  try:
    importlib.import_module(module).main([])
  except Caught:
    pass
  finally:
    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
  assert parsers, f"{module}.main builds no argparse parser"
  return {s[2:] for s in parsers[0]._option_string_actions if s.startswith("--")}  # noqa: SLF001


@functools.cache
def known_flags(module: str) -> tuple[frozenset[str], frozenset[str]]:
  """(every flag name, the boolean ones) of a command module."""
  if module == "cras_jax.console":
    return frozenset(), frozenset()
  spec = importlib.util.find_spec(module)
  assert spec is not None, f"no module {module}"
  definer = _define_flags_module(module)
  if definer is None:  # argparse: the module's main, or its logic module's, builds the parser
    for name in (module, "cras_jax.deploy." + module.rsplit(".", 1)[-1]):
      source = importlib.util.find_spec(name)
      if source and "argparse" in pathlib.Path(source.origin).read_text(encoding="utf-8"):
        return frozenset(_argparse_flags(name) | {"help"}), frozenset()
    raise AssertionError(f"{module}: neither define_flags nor an argparse parser found")
  fv = flags.FlagValues()
  importlib.import_module(definer).define_flags(fv)
  errors.define_verbose_flag(fv)
  defined = fv._flags()  # noqa: SLF001 - names and their Flag objects
  booleans = {n for n, f in defined.items() if isinstance(f, flags.BooleanFlag)}
  return frozenset(defined) | _STANDARD_FLAGS, frozenset(booleans | {"verbose"})


@functools.cache
def _config_fields() -> frozenset[str]:
  names = {f.name for f in schema.FIELDS}
  return frozenset(names | {n.rsplit(".", i)[0] for n in names for i in range(1, n.count(".") + 1)})


def flag_problems(module: str, args: list[str]) -> list[str]:
  """What a command line gets wrong: a module that does not exist, flags it does not define,
  `--config.<field>` overrides of fields the schema does not have."""
  if module.endswith("(not a command)"):
    return [f"{module}: cras-jax names a command first ({', '.join(console.COMMANDS)})"]
  if importlib.util.find_spec(module) is None:
    return [f"no module {module}"]
  used = [a.strip("[]") for a in args]
  used = [a for a in used if a.startswith("--") and a != "--"]
  if not used:
    return []
  names, booleans = known_flags(module)
  problems = []
  for arg in used:
    name = arg[2:].split("=", 1)[0]
    if name.startswith("config."):
      if "config" not in names:
        problems.append(f"{arg}: {module} has no --config")
      elif name[len("config.") :] not in _config_fields():
        problems.append(f"{arg}: no config field {name[len('config.') :]} in base/schema.py")
    elif name not in names and not (name.startswith("no") and name[2:] in booleans):
      problems.append(f"{arg}: {module} has no flag --{name}")
  return problems


@pytest.mark.parametrize("doc", DOCS)
def test_commands_in_code_blocks_use_flags_their_command_defines(doc):
  problems = []
  for line, module, args in command_lines(doc):
    problems += [f"{doc}: {line}\n    {p}" for p in flag_problems(module, args)]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_commands_in_inline_code_use_flags_their_command_defines(doc):
  problems = []
  for line, module, args in command_lines(doc, fenced=False):
    problems += [f"{doc}: {line}\n    {p}" for p in flag_problems(module, args)]
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_no_retired_spellings(doc):
  """One console script (`cras-jax <command>`); the package's modules run as cras_jax's."""
  text = _read(doc)
  assert not re.findall(r"cras-jax-[a-z]", text), doc
  assert not re.findall(r"python -m tools\.(?!convert_torchvision|convert_visa)\w", text), doc


def test_the_documents_spell_enough_commands_to_check():
  fenced = [c for doc in DOCS for c in command_lines(doc)]
  modules = {module for _, module, _ in fenced}
  assert len(fenced) >= 20, fenced
  assert {"cras_jax.main", "cras_jax.predict", "cras_jax.export"} <= modules, modules


def test_the_checker_finds_wrong_flags():
  ((_, module, args),) = command_lines_of("python -m cras_jax.predict --workdir=x --no_such_flag")
  assert flag_problems(module, args) == [
      "--no_such_flag: cras_jax.predict has no flag --no_such_flag"
  ]
  ((_, module, args),) = command_lines_of("cras-jax train --config.model.no_such_field=1")
  assert "no config field model.no_such_field" in flag_problems(module, args)[0]
  ((_, module, args),) = command_lines_of("cras-jax --config=demo --workdir=runs/demo")
  assert "names a command first" in flag_problems(module, args)[0]
  ((_, module, args),) = command_lines_of("python -m cras_jax.run_onnx m.onnx x.npy --nope=1")
  assert flag_problems(module, args) == ["--nope=1: cras_jax.run_onnx has no flag --nope"]
  for line in (
      "python -m cras_jax.benchmark --config=configs/demo.py --nobreakdown  # a comment --x",
      "X=1 python -m cras_jax.main --config=configs/demo.py --workdir=w --config.train.epochs=3",
      "python tools/convert_visa.py <visa> <out> [--classes=candle]",
  ):
    ((_, module, args),) = command_lines_of(line)
    assert flag_problems(module, args) == [], line


def command_lines_of(text: str) -> list[tuple[str, str, list[str]]]:
  """command_lines of one line of text, as if it were a fenced block of a document."""
  return [(text, *c) for tokens in _segments(text) if (c := command(tokens))]
