"""The four ROUTE tasks as prompts, and parsers for the model's answers (paper Sec. 3.1 and 3.2).

TS  text-to-SQL:          schema + question               -> SQL
SL  schema linking:       schema + question               -> {"table": ["column", ...]}
NC  noise correction:     schema + question + SQL (+ run) -> "correct", or "wrong" + fixed SQL
CW  continuation writing: schema + question + SQL start   -> the rest of the SQL

The same templates serve the MCP chain (mcp.py) and the training data (msft.py): a fine-tuned model sees at
inference exactly the format it was trained on. Every prompt comes in three parts, cut where the KV cache can
be shared (generate.py):
  1. system prompt + schema with sample rows: the same for every task and question on that database, which is
     why the schema comes first and the task after it;
  2. the task's instructions (with worked examples for models not tuned on these tasks);
  3. the question, the task's inputs, and the answer's opening: TS and CW open a ```sql fence (CW's unfinished
     SQL follows it) and SL a ```json one, so that the model writes only the answer and stops at the closing
     fence; NC opens nothing: its answer is a verdict ("correct") or "wrong" and a fenced fix (STOP).
"""
import json
import re

from .sql import extract_sql

SYSTEM = ("You are a careful SQLite expert. Given a database schema, you write SQL queries that answer "
          "questions about the data, link questions to the tables and columns they need, check SQL queries "
          "for mistakes, and complete unfinished ones.")

INSTRUCTIONS = {
    "ts": "### Task: text-to-SQL\nWrite one SQLite query that answers the question, using only the tables "
          "and columns of the schema above.",
    "sl": "### Task: schema linking\nList the tables and columns that a SQLite query answering the question "
          "needs (including the columns used to join tables), as a JSON object mapping each table to a "
          "list of its columns.",
    "nc": "### Task: noise correction\nA SQLite query was written for the question and run on the database. "
          "Check whether it answers the question correctly. If it does, reply `correct`. Otherwise reply "
          "`wrong` followed by the corrected query in a ```sql block.",
    "cw": "### Task: continuation writing\nComplete the unfinished SQLite query so that it answers the "
          "question.",
}

# Worked examples for models not tuned on SL/NC/CW (the paper prompts untuned models few-shot). They use
# small schemas from Spider's *training* databases, never dev ones.
_DEMO_SCHEMA = (
    "CREATE TABLE department (Department_ID INT, Name TEXT, Budget_in_Billions REAL, PRIMARY KEY (Department_ID));\n"
    "CREATE TABLE head (head_ID INT, name TEXT, born_state TEXT, age REAL, PRIMARY KEY (head_ID));\n"
    "CREATE TABLE management (department_ID INT, head_ID INT, temporary_acting TEXT, "
    "PRIMARY KEY (department_ID, head_ID), FOREIGN KEY (department_ID) REFERENCES department(Department_ID), "
    "FOREIGN KEY (head_ID) REFERENCES head(head_ID));")
DEMOS = {
    "sl": [("What are the names of the heads who are acting temporarily?",
            '{"head": ["name", "head_ID"], "management": ["head_ID", "temporary_acting"]}'),
           ("How many departments have a budget over 10 billion?", '{"department": ["Budget_in_Billions"]}')],
    "nc": [("What is the average age of the heads born in California?",
            "SELECT avg(age) FROM head WHERE born_state = 'California'", "1 row: (56.5,)", "correct"),
           ("List the names of departments in descending order of budget.",
            "SELECT Name FROM department ORDER BY Budget_in_Billions", "15 rows: ('State',), ('Treasury',), ...",
            "wrong\n```sql\nSELECT Name FROM department ORDER BY Budget_in_Billions DESC\n```"),
           ("How many heads are older than 56?", "SELECT count(*) FROM heads WHERE age > 56",
            "error: no such table: heads", "wrong\n```sql\nSELECT count(*) FROM head WHERE age > 56\n```")],
    "cw": [("Which department has the largest budget?", "SELECT Name FROM department",
            " ORDER BY Budget_in_Billions DESC LIMIT 1"),
           ("Show the names of heads who manage a department.", "SELECT DISTINCT T1.name FROM",
            " head AS T1 JOIN management AS T2 ON T1.head_ID = T2.head_ID")],
}


def instructions(task: str, fewshot: bool) -> str:
    text = INSTRUCTIONS[task]
    if not fewshot or task not in DEMOS:
        return text
    lines = [text, "\nExamples on another database:", _DEMO_SCHEMA]
    for demo in DEMOS[task]:
        if task == "sl":
            lines += [f"Question: {demo[0]}", f"Answer:\n```json\n{demo[1]}\n```"]
        elif task == "nc":
            lines += [f"Question: {demo[0]}", f"SQL: {demo[1]}", f"Execution: {demo[2]}", f"Answer:\n{demo[3]}"]
        else:
            lines += [f"Question: {demo[0]}", f"Answer:\n```sql\n{demo[1]}{demo[2]}\n```"]
    return "\n".join(lines) + "\n\nNow the task on the database above."


def describe_execution(result) -> str:
    """What NC sees of a query's run: the error, or the row count and the first rows."""
    if result.error:
        return f"error: {result.error}"
    rows = result.rows
    shown = ", ".join(repr(tuple(r)) for r in rows[:3])
    more = ", ..." if len(rows) > 3 or result.truncated else ""
    return f"{len(rows)}{'+' if result.truncated else ''} row{'s' if len(rows) != 1 else ''}" + \
        (f": {shown}{more}" if rows else " (empty result)")


def messages(task: str, schema: str, question: str, evidence: str = "", fewshot: bool = False, sql: str = "",
             execution: str = "", partial: str = "") -> tuple[list[dict], str]:
    """The chat messages of one task prompt, and the text that opens the assistant's answer."""
    inputs = f"### Question: {question.strip()}" + (f"\n### Hint: {evidence.strip()}" if evidence else "")
    if task == "nc":
        inputs += f"\n### SQL: {sql.strip()}\n### Execution: {execution}"
    user = f"{schema}\n\n{instructions(task, fewshot)}\n\n{inputs}"
    answer_start = {"ts": "```sql\n", "sl": "```json\n", "nc": "", "cw": f"```sql\n{partial}"}[task]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], answer_start


def render(tok, msgs: list[dict], answer_start: str) -> str:
    return tok.chat(msgs) + answer_start


def cut(tok, task: str, msgs: list[dict], answer_start: str, fewshot: bool = False) -> tuple[str, str, str]:
    """A task prompt in the model's chat format, cut into its three cache parts. Training and inference (build)
    both cut here and encode each part on its own (Tokenizer.encode_parts): the very same token ids."""
    text = render(tok, msgs, answer_start)
    task_text = instructions(task, fewshot)
    cut1 = text.index(f"\n\n{task_text}\n\n")  # the user turn is schema, instructions, inputs
    cut2 = cut1 + 2 + len(task_text)
    return text[:cut1], text[cut1:cut2], text[cut2:]


def build(tok, task: str, schema: str, question: str, evidence: str = "", fewshot: bool = False,
          **inputs) -> tuple[str, str, str]:
    """One task prompt in the model's chat format, cut into its three cache parts."""
    return cut(tok, task, *messages(task, schema, question, evidence, fewshot, **inputs), fewshot)


# Where generation stops. NC keeps its stop string (mcp.py passes keep_stop): "correct\n" ends a verdict that
# needs nothing more (the verdicts are "correct"/"wrong", so one never contains the other), and a model
# imitating the few-shot examples would go on with a "Question:" of its own.
STOP = {"ts": ("```",), "sl": ("```",), "cw": ("```",), "nc": ("correct\n", "Correct\n", "\n```\n", "\nQuestion:")}


def target(task: str, answer) -> str:
    """The text a model should write after the prompt (the trainer adds the chat's end token). `answer`: the SQL
    (ts), the table -> columns dict (sl), the gold SQL or None for a correct candidate (nc), the SQL's rest (cw)."""
    if task == "sl":
        return json.dumps({t: sorted(c) for t, c in answer.items()}) + "\n```"
    if task == "nc":
        return "correct" if answer is None else f"wrong\n```sql\n{answer.strip()}\n```"
    return f"{answer.rstrip()}\n```"


# -- parsers: every one survives any text a model writes ----------------------------------------------------


def parse_sql(answer: str, partial: str = "") -> str:
    """TS/CW answers: the prompt opened the fence, so the answer is SQL up to the stop (or any text)."""
    text = partial + (answer or "")
    return extract_sql(f"```sql\n{text}\n```") or extract_sql(text)


def parse_links(answer: str, db) -> dict[str, set[str]]:
    """SL answers -> {table: {columns}} in the schema's own spelling; unknown names are dropped."""
    answer = answer or ""
    found: dict[str, set[str]] = {}
    try:
        obj = json.loads(answer[answer.index("{"):answer.rindex("}") + 1])
        pairs = [(t, c) for t, cols in obj.items() for c in (cols if isinstance(cols, list) else [cols])] + \
                [(t, None) for t in obj]
    except (ValueError, AttributeError, TypeError):
        # not JSON: take "table": [...] groups, or any table names mentioned
        pairs = [(t, c) for t, body in re.findall(r'"?(\w+)"?\s*:\s*\[([^\]]*)\]', answer)
                 for c in re.findall(r"\w+", body)] + [(w, None) for w in re.findall(r"\w+", answer)]
    for t, c in pairs:
        table = db.table(str(t))
        if table is None:
            continue
        cols = found.setdefault(table.name, set())
        if c is not None and (col := table.column(str(c))) is not None:
            cols.add(col.name)
    return found


def parse_verdict(answer: str) -> tuple[bool, str]:
    """NC answers -> (judged correct, corrected SQL or ""). Anything unclear counts as "no change"."""
    answer = (answer or "").strip()
    if re.match(r"^(correct|yes)\b", answer, re.I):
        return True, ""
    return False, extract_sql(answer)
