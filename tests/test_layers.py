"""The layering of T5X: train.py and evaluate.py are siblings over partitioning / trainer / evaluator and
never import each other (a circle made gin need one imported before parsing the other's files). The graph is
read from the sources (imports inside functions count), so no process has to start."""
import ast
import json

from conftest import REPO

LIBRARY = REPO / "recalign"


def imports_of(path) -> set[str]:
  """The recalign modules a file imports, at its top or inside functions (a lazy import is an edge too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("recalign")}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("recalign"):
      for a in node.names:   # `from recalign import train`: a module; `from recalign.x import f`: x
        sub = f"{node.module}.{a.name}"
        out.add(sub if (LIBRARY.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                or (LIBRARY.parent / sub.replace(".", "/")).is_dir() else node.module)
  return out


def import_graph() -> dict[str, set[str]]:
  graph = {}
  for path in LIBRARY.rglob("*.py"):
    name = ".".join(path.relative_to(LIBRARY.parent).with_suffix("").parts).removesuffix(".__init__")
    graph[name] = imports_of(path)
  return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    m = todo.pop()
    for dep in graph.get(m, ()):
      # importing a.b.c runs a/__init__ and a/b/__init__ first
      for parent in (".".join(dep.split(".")[:i]) for i in range(2, dep.count(".") + 2)):
        if parent not in seen:
          seen.add(parent)
          todo.append(parent)
  return seen


def test_train_and_evaluate_are_siblings_over_the_layers_below():
  graph = import_graph()
  assert {"recalign.train", "recalign.evaluate", "recalign.trainer", "recalign.evaluator"} <= set(graph)
  below = {"recalign.trainer", "recalign.evaluator", "recalign.partitioning", "recalign.run_record"}
  assert "recalign.evaluate" not in reachable(graph, "recalign.train")
  assert "recalign.train" not in reachable(graph, "recalign.evaluate")
  assert {"recalign.partitioning", "recalign.evaluator", "recalign.run_record"} <= reachable(graph, "recalign.evaluate")
  assert {"recalign.trainer", "recalign.partitioning", "recalign.evaluator"} <= reachable(graph, "recalign.train")
  for layer in below:          # nothing below imports a job, the CLI or the demo
    assert not reachable(graph, layer) & {"recalign.train", "recalign.evaluate", "recalign.cli", "recalign.demo",
                                            "recalign.experiments"}, layer


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The graph's strongly connected components of more than one module (Tarjan). Edges are the imports a
  module names; a package's __init__ re-exporting its submodules is not counted as their importer's
  importer (that is how every package with an __init__ works)."""
  index, low, stack, on, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in graph or w == v:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      part = []
      while not part or part[-1] != v:
        part.append(stack.pop())
        on.discard(part[-1])
      if len(part) > 1:
        found.append(sorted(part))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_circle_among_recalign_modules():
  assert circles(import_graph()) == []
  assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]    # the check finds one


# Functions longer than ~80 lines, each with its reason in docs/architecture.md ("Long functions").
LONG_FUNCTIONS = {"recalign/train.py:train", "recalign/cli.py:build_parser"}


def body_lines(fn: ast.FunctionDef) -> int:
  """Lines of a function without its docstring."""
  doc = fn.body[0] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
      getattr(fn.body[0], "value", None), ast.Constant) and isinstance(fn.body[0].value.value, str) else None
  return fn.end_lineno - fn.lineno + 1 - ((doc.end_lineno - doc.lineno + 1) if doc else 0)


def test_no_function_over_80_lines_except_where_the_docs_say_why():
  long = set()
  for path in LIBRARY.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > 80:
        long.add(f"{path.relative_to(REPO)}:{node.name}")
  assert long <= LONG_FUNCTIONS, long - LONG_FUNCTIONS
  docs = (REPO / "docs" / "architecture.md").read_text()
  for name in LONG_FUNCTIONS:
    assert f"`{name}`" in docs, name


def test_the_import_graph_sees_lazy_imports(tmp_path):
  f = tmp_path / "m.py"
  f.write_text("import os\nfrom recalign import train as T\ndef g():\n  from recalign.evaluator import x\n"
               "  import recalign.tasks.registry\n")
  assert imports_of(f) == {"recalign.train", "recalign.evaluator", "recalign.tasks.registry"}
  assert reachable({"a": {"recalign.tasks.registry"}}, "a") == {"recalign.tasks", "recalign.tasks.registry"}


def test_the_run_record_reads_every_version_it_wrote(tmp_path):
  from recalign.run_record import VERSION, RunRecord
  base = {"network_config": {"d_model": 8}, "mixture_or_task_name": "tiny_retrieval",
          "task_feature_lengths": {"inputs": 8, "targets": 4}, "train_steps": 3}
  old = tmp_path / "v1_dataset_config"                    # before 2026-11-30
  old.mkdir()
  (old / "run.json").write_text(json.dumps({**base, "dataset_config": {"window": 20}, "data_dirs": ["/d"]}))
  rec = RunRecord.find(old / "checkpoints" / "3")
  assert (rec.version, rec.task_config, rec.data_dirs) == (1, {"window": 20}, ("/d",))
  new = tmp_path / "v2"
  RunRecord(**base, task_config={"window": 5}).write(new.mkdir() or new)
  again = RunRecord.read(new)
  assert again.version == VERSION == json.loads((new / "run.json").read_text())["version"] and again.task_config == {
      "window": 5}
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "run.json").write_text(json.dumps({"train_steps": 3}))
  import pytest
  with pytest.raises(ValueError, match="run.json lacks .*network_config"):
    RunRecord.read(tmp_path / "bad")


def test_a_mixture_and_a_model_file_without_a_run_file_get_the_from_scratch_run(monkeypatch):
  """`recalign train --gin_file=gin/retrieval_aux.gin --gin_file=gin/models/tiny.gin`: the model file's
  macros (DROPOUT_RATE) belong to run files; gin used to stop with "No bindings specified"."""
  import gin
  from recalign import cli
  monkeypatch.chdir(REPO)
  try:
    added = cli.parse_train_config(["recalign/gin/retrieval_aux.gin", "recalign/gin/models/tiny.gin"],
                                   ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'tiny_retrieval'"], [])
    assert added == cli.DEFAULT_RUN
    assert gin.query_parameter("%MODEL_SIZE") == "tiny" and gin.query_parameter("%DROPOUT_RATE") == 0.1
    gin.clear_config()
    bindings = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'tiny_retrieval'"]
    assert cli.parse_train_config(["recalign/gin/runs/from_scratch.gin", "recalign/gin/retrieval_aux.gin",
                                   "recalign/gin/models/tiny.gin"], bindings, []) == []    # a run given: nothing added
  finally:
    gin.clear_config()
