"""route.sql: extraction from model output, tables/columns used, clause cuts, Spider difficulty."""
import json

import pytest

from conftest import demo_db
from route.database import open_database
from route.sql import (clause_prefixes, count_tables, difficulty, extract_sql, normalize, order_matters, parse,
                       remove_distinct, used_schema)

# -- extract_sql -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, sql", [
    ("```sql\nSELECT 1\n```\nthen\n```sql\nSELECT name FROM singer;\n```", "SELECT name FROM singer"),
    ("Try ```sql SELECT a FROM t``` or ```SQL\nSELECT b FROM t\n```.", "SELECT b FROM t"),
    ("```\nSELECT a FROM t\n```", "SELECT a FROM t"),  # a bare block holding SQL
    ("```python\nprint(1)\n```\nSELECT a FROM t", "SELECT a FROM t"),
    ("```sql\nSELECT a\nFROM t\nWHERE b = 1", "SELECT a\nFROM t\nWHERE b = 1"),  # the model ran out of tokens
    ("The answer is SELECT count(*) FROM head WHERE age > 56; it counts heads.", "SELECT count(*) FROM head WHERE age > 56"),
    ("SELECT a FROM t WHERE s = 'x; y'\n\nThis query filters.", "SELECT a FROM t WHERE s = 'x; y'"),
    ("Starting with the join: WITH c AS (SELECT 1 AS x) SELECT x FROM c", "WITH c AS (SELECT 1 AS x) SELECT x FROM c"),
    ("answer: select name from t", "select name from t"),
    ("```sql\nSELECT a FROM t; DROP TABLE t;\n```", "SELECT a FROM t"),
    ("I cannot answer that.", ""), ("", ""), (None, ""), ("```sql\n```", ""), (42, ""),
])
def test_extract_sql(text, sql):
    assert extract_sql(text) == sql


GARBAGE = ["", "   ", "hello world", "SELECT", "SELECT FROM WHERE", "((((", "SELECT (((1", "'unterminated",
           "SELECT a FROM t WHERE", "DROP TABLE x", "SELECT 1; SELECT 2", "\x00\xff", "SELECT " + "(" * 3000,
           "```", "WITH", "SELECT * FROM t UNION", None]


@pytest.mark.parametrize("text", GARBAGE)
def test_never_raises(text):
    db = open_database(demo_db("concert_singer"))
    extract_sql(text)
    parse(text)
    normalize(text)
    assert isinstance(used_schema(text, db), dict)
    assert isinstance(clause_prefixes(text), list)
    assert isinstance(count_tables(text), int)
    assert difficulty(text) in ("easy", "medium", "hard", "extra", "unknown")
    order_matters(text or "")


def test_parse_and_normalize():
    assert parse("hello world") is None and parse("DROP TABLE t") is None and parse("") is None
    assert parse("select a from t").sql() == "SELECT a FROM t"
    assert normalize("select  a from\n t") == "SELECT a FROM t"
    assert normalize("SELECT  FROM  WHERE") == "SELECT FROM WHERE"  # unparseable: whitespace collapsed


def test_order_matters_and_remove_distinct():
    assert order_matters("SELECT a FROM t ORDER BY a")
    assert order_matters("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1")
    assert not order_matters("SELECT a FROM t WHERE b = (SELECT b FROM u ORDER BY c LIMIT 1)")
    assert remove_distinct("SELECT DISTINCT a, count(DISTINCT b) FROM t WHERE c = 'distinct'") == \
        "SELECT  a, count( b) FROM t WHERE c = 'distinct'"


# -- used_schema -------------------------------------------------------------------------------------------


@pytest.fixture
def concert():
    return open_database(demo_db("concert_singer"))


@pytest.mark.parametrize("sql, expected", [
    ("SELECT T2.name FROM singer_in_concert AS T1 JOIN singer AS T2 ON T1.singer_id = T2.singer_id "
     "JOIN concert AS T3 ON T1.concert_id = T3.concert_id WHERE T3.year = 2014",
     {"singer_in_concert": {"Singer_ID", "concert_ID"}, "singer": {"Singer_ID", "Name"},
      "concert": {"concert_ID", "Year"}}),
    ("SELECT count(*) FROM singer", {"singer": set()}),
    ("SELECT count(*) FROM concert WHERE stadium_id = (SELECT stadium_id FROM stadium ORDER BY capacity DESC LIMIT 1)",
     {"concert": {"Stadium_ID"}, "stadium": {"Stadium_ID", "Capacity"}}),
    ("SELECT name FROM stadium WHERE stadium_id NOT IN (SELECT stadium_id FROM concert WHERE year IN "
     "(SELECT song_release_year FROM singer))",
     {"stadium": {"Name", "Stadium_ID"}, "concert": {"Stadium_ID", "Year"}, "singer": {"Song_release_year"}}),
    ("SELECT country FROM singer WHERE age > 40 INTERSECT SELECT country FROM singer WHERE age < 30",
     {"singer": {"Country", "Age"}}),
    ("SELECT name FROM stadium EXCEPT SELECT T2.name FROM concert AS T1 JOIN stadium AS T2 "
     "ON T1.stadium_id = T2.stadium_id WHERE T1.year = 2014",
     {"stadium": {"Name", "Stadium_ID"}, "concert": {"Stadium_ID", "Year"}}),
    ("SELECT name FROM singer UNION SELECT theme FROM concert ORDER BY name", {"singer": {"Name"}, "concert": {"Theme"}}),
    ("SELECT * FROM singer_in_concert", {"singer_in_concert": {"concert_ID", "Singer_ID"}}),
    ("SELECT T1.*, T2.theme FROM singer_in_concert AS T1 JOIN concert AS T2 ON T1.concert_id = T2.concert_id",
     {"singer_in_concert": {"concert_ID", "Singer_ID"}, "concert": {"concert_ID", "Theme"}}),
    # correlated subquery: `T1.age` belongs to the outer query; `s.name` to the inner one
    ("SELECT T1.name FROM singer AS T1 WHERE EXISTS (SELECT 1 FROM singer AS s WHERE s.age > T1.age AND s.name = 'x')",
     {"singer": {"Name", "Age"}}),
    ("SELECT x FROM (SELECT name AS x, age FROM singer) WHERE age > 30", {"singer": {"Name", "Age"}}),
    ("WITH old AS (SELECT singer_id FROM singer WHERE age > 40) SELECT count(*) FROM old JOIN singer_in_concert AS s "
     "ON old.singer_id = s.singer_id", {"singer": {"Singer_ID", "Age"}, "singer_in_concert": {"Singer_ID"}}),
    ("SELECT SINGER.NAME, count(*) AS n FROM SINGER GROUP BY country ORDER BY n", {"singer": {"Name", "Country"}}),
    ("SELECT name, nonsense FROM singer JOIN ghosts", {"singer": {"Name"}}),  # unknown names are left out
    ("this is not sql", {}),
])
def test_used_schema(concert, sql, expected):
    assert used_schema(sql, concert) == expected


def test_count_tables():
    assert count_tables("SELECT count(*) FROM singer") == 1
    assert count_tables("SELECT a FROM t AS x JOIN u AS y ON x.a = y.a JOIN t AS z ON z.a = x.a") == 2
    assert count_tables("SELECT a FROM t WHERE a IN (SELECT b FROM u) EXCEPT SELECT c FROM v") == 3
    assert count_tables("WITH c AS (SELECT a FROM t) SELECT a FROM c") == 1
    assert count_tables("not sql") == 0


# -- clause_prefixes ---------------------------------------------------------------------------------------


def test_clause_prefixes():
    sql = ("SELECT DISTINCT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid "
           "WHERE T1.age > (SELECT avg(age) FROM singer WHERE country = 'France') GROUP BY T1.name "
           "HAVING count(*) > 1 ORDER BY T1.name DESC LIMIT 3;")
    assert clause_prefixes(sql) == [
        "SELECT DISTINCT",
        "SELECT DISTINCT T1.name",
        "SELECT DISTINCT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid",
        "SELECT DISTINCT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid "
        "WHERE T1.age > (SELECT avg(age) FROM singer WHERE country = 'France')",
        "SELECT DISTINCT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid "
        "WHERE T1.age > (SELECT avg(age) FROM singer WHERE country = 'France') GROUP BY T1.name",
        "SELECT DISTINCT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid "
        "WHERE T1.age > (SELECT avg(age) FROM singer WHERE country = 'France') GROUP BY T1.name HAVING count(*) > 1",
        "SELECT DISTINCT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid "
        "WHERE T1.age > (SELECT avg(age) FROM singer WHERE country = 'France') GROUP BY T1.name HAVING count(*) > 1 "
        "ORDER BY T1.name DESC",
    ]
    assert clause_prefixes("SELECT a FROM t INTERSECT SELECT a FROM u") == [
        "SELECT", "SELECT a", "SELECT a FROM t", "SELECT a FROM t INTERSECT SELECT", "SELECT a FROM t INTERSECT SELECT a"]
    assert clause_prefixes("SELECT a FROM t WHERE s = 'x FROM y'") == ["SELECT", "SELECT a", "SELECT a FROM t"]
    assert clause_prefixes("SELECT 1") == ["SELECT"]


def test_clause_prefixes_on_all_gold(dev_sample):
    for ex in json.loads(dev_sample.read_text()):
        sql = ex["query"].strip().rstrip(";").rstrip()
        cuts = clause_prefixes(sql)
        assert cuts and all(sql.startswith(p) and p != sql for p in cuts)
        assert cuts == sorted(cuts, key=len)


# -- difficulty --------------------------------------------------------------------------------------------

# Checked by hand against eval_hardness (component1 / component2 / others) of Spider's evaluation.py.
LEVELS = {
    "easy": [
        "SELECT count(*) FROM singer",
        "SELECT * FROM hiring",
        "SELECT count(DISTINCT pettype) FROM pets",
        "SELECT DISTINCT country FROM singer WHERE age > 20",
        "SELECT avg(mpg) FROM CARS_DATA WHERE Cylinders = 4",
        "select distinct year from cars_data where weight between 3000 and 4000",
        "SELECT Abbreviation FROM AIRLINES WHERE Airline = 'JetBlue Airways'",
        "SELECT name FROM conductor ORDER BY Year_of_Work DESC",
        "SELECT count(*) FROM singer WHERE age > 30",
        "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid",
        "SELECT max(age) FROM singer",
        "SELECT a FROM t GROUP BY a HAVING count(*) > 1",  # HAVING's aggregate is not counted
    ],
    "medium": [
        "SELECT avg(age), min(age), max(age) FROM singer WHERE country = 'France'",
        "SELECT song_name, song_release_year FROM singer ORDER BY age LIMIT 1",
        "SELECT name, country FROM singer WHERE song_name LIKE '%Hey%'",
        "SELECT max(weight), petType FROM pets GROUP BY petType",
        "SELECT count(*) FROM student AS T1 JOIN has_pet AS T2 ON T1.stuid = T2.stuid WHERE T1.age > 20",
        "SELECT Maker, Model FROM MODEL_LIST",
        "SELECT T1.CountryName, T1.CountryId FROM COUNTRIES AS T1 JOIN CAR_MAKERS AS T2 "
        "ON T1.CountryId = T2.Country GROUP BY T1.CountryId HAVING count(*) >= 1",
        "SELECT count(*) FROM orchestra WHERE Major_Record_Format = 'CD' OR Major_Record_Format = 'DVD'",
        "SELECT name FROM singer WHERE age > 20 AND country = 'France'",
        "SELECT name FROM singer WHERE age NOT IN (1, 2) AND country = 'x'",
        "SELECT a FROM t GROUP BY a HAVING count(*) > 1 AND sum(b) > 2 ORDER BY a",
        "SELECT name FROM singer ORDER BY age LIMIT 1",
        "SELECT name FROM singer WHERE name LIKE '%a%'",  # LIKE is a component of its own
    ],
    "hard": [
        "SELECT country FROM singer WHERE age > 40 INTERSECT SELECT country FROM singer WHERE age < 30",
        "SELECT name FROM stadium EXCEPT SELECT T2.name FROM concert AS T1 JOIN stadium AS T2 "
        "ON T1.stadium_id = T2.stadium_id WHERE T1.year = 2014",
        "SELECT T2.name FROM singer_in_concert AS T1 JOIN singer AS T2 ON T1.singer_id = T2.singer_id "
        "JOIN concert AS T3 ON T1.concert_id = T3.concert_id WHERE T3.year = 2014",
        "select count(*) from concert where stadium_id = (select stadium_id from stadium order by capacity desc limit 1)",
        "SELECT T1.Model FROM CAR_NAMES AS T1 JOIN CARS_DATA AS T2 ON T1.MakeId = T2.Id ORDER BY T2.horsepower ASC LIMIT 1",
        "SELECT name FROM employee WHERE Employee_ID NOT IN (SELECT Employee_ID FROM evaluation)",
        "SELECT template_type_code FROM Templates GROUP BY template_type_code ORDER BY count(*) DESC LIMIT 1",
        "SELECT T3.Name, T2.Course FROM course_arrange AS T1 JOIN course AS T2 ON T1.Course_ID = T2.Course_ID "
        "JOIN teacher AS T3 ON T1.Teacher_ID = T3.Teacher_ID ORDER BY T3.Name",
        "SELECT name FROM singer UNION SELECT name FROM stadium",
        "SELECT a, b, c FROM t WHERE x = 1 AND y = 2 GROUP BY a, b",  # others = 3, component1 = 2
        "SELECT AirportName FROM Airports WHERE AirportCode NOT IN "
        "(SELECT SourceAirport FROM Flights UNION SELECT DestAirport FROM Flights)",
        "SELECT name FROM singer WHERE age > 20 OR age < 10 ORDER BY name",
        # the ORDER BY after a set operation belongs to its last SELECT in Spider's parse, not the first
        "SELECT name FROM singer WHERE age > 20 UNION SELECT name FROM stadium WHERE capacity > 10 ORDER BY name",
        "SELECT count(*), name FROM singer GROUP BY name HAVING count(*) > 1 ORDER BY count(*) DESC LIMIT 1",
        "SELECT a FROM t JOIN u ON t.x = u.x JOIN v ON v.y = u.y JOIN w ON w.z = v.z",
    ],
    "extra": [
        "SELECT T2.name, T2.capacity FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id "
        "WHERE T1.year >= 2014 GROUP BY T2.stadium_id ORDER BY count(*) DESC LIMIT 1",
        "SELECT T1.Fname FROM student AS T1 JOIN has_pet AS T2 ON T1.stuid = T2.stuid JOIN pets AS T3 "
        "ON T3.petid = T2.petid WHERE T3.pettype = 'cat' INTERSECT SELECT T1.Fname FROM student AS T1 "
        "JOIN has_pet AS T2 ON T1.stuid = T2.stuid JOIN pets AS T3 ON T3.petid = T2.petid WHERE T3.pettype = 'dog'",
        "SELECT T2.CountryName FROM CAR_MAKERS AS T1 JOIN COUNTRIES AS T2 ON T1.Country = T2.CountryId "
        "GROUP BY T1.Country ORDER BY Count(*) DESC LIMIT 1",
        "SELECT T1.AirportCode FROM AIRPORTS AS T1 JOIN FLIGHTS AS T2 ON T1.AirportCode = T2.DestAirport "
        "OR T1.AirportCode = T2.SourceAirport GROUP BY T1.AirportCode ORDER BY count(*) DESC LIMIT 1",
        # a NOT condition counts as an aggregate: with count(*) that is two, so "others" = 1 beside a nested query
        "SELECT count(*) FROM contestants WHERE contestant_number NOT IN (SELECT contestant_number FROM votes)",
        "SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code = T2.CountryCode "
        "WHERE T2.Language = 'English' INTERSECT SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 "
        "ON T1.Code = T2.CountryCode WHERE T2.Language = 'French'",
        "SELECT name FROM country WHERE continent = 'Asia' AND population > (SELECT max(population) FROM country "
        "WHERE continent = 'Africa')",
        "SELECT a FROM t WHERE b IN (SELECT b FROM u) AND c IN (SELECT c FROM v)",
        "SELECT name FROM singer WHERE age > 20 OR age < 10 UNION SELECT name FROM stadium",
        "SELECT count(*), name FROM singer WHERE age > 20 GROUP BY name ORDER BY count(*) DESC LIMIT 1",
        "SELECT a FROM t JOIN u ON t.x = u.x JOIN v ON v.y = u.y JOIN w ON w.z = v.z JOIN z ON z.a = w.a",
        "SELECT a FROM t WHERE x LIKE 'a%' OR x LIKE 'b%' ORDER BY a LIMIT 3",
    ],
}


@pytest.mark.parametrize("level, sql", [(lv, q) for lv, qs in LEVELS.items() for q in qs])
def test_difficulty_hand_checked(level, sql):
    assert difficulty(sql) == level


# The official rules applied to the official parse that dev.json carries with every query ("sql").
def _official_hardness(sql: dict) -> str:
    def conds(s):
        return s["from"]["conds"][::2] + s["where"][::2] + s["having"][::2]
    nested = sum(isinstance(v, dict) for cu in conds(sql) for v in cu[3:5])
    nested += sum(sql[k] is not None for k in ("intersect", "except", "union"))
    c1 = sum(bool(sql[k]) for k in ("where", "groupBy", "orderBy")) + (sql["limit"] is not None)
    c1 += max(0, len(sql["from"]["table_units"]) - 1)
    c1 += (sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]).count("or")
    c1 += sum(cu[1] == 9 for cu in conds(sql))  # WHERE_OPS.index("like")

    def n_agg(units):
        return sum(u[0] != 0 for u in units)
    aggs = n_agg(sql["select"][1]) + n_agg(sql["where"][::2]) + n_agg(sql["groupBy"]) + n_agg(sql["having"])
    if sql["orderBy"]:
        aggs += n_agg([u[1] for u in sql["orderBy"][1] if u[1]] + [u[2] for u in sql["orderBy"][1] if u[2]])
    others = (aggs > 1) + (len(sql["select"][1]) > 1) + (len(sql["where"]) > 1) + (len(sql["groupBy"]) > 1)
    if c1 <= 1 and others == 0 and nested == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and nested == 0) or (c1 <= 2 and others < 2 and nested == 0):
        return "medium"
    if (others > 2 and c1 <= 2 and nested == 0) or (2 < c1 <= 3 and others <= 2 and nested == 0) or \
            (c1 <= 1 and others == 0 and nested <= 1):
        return "hard"
    return "extra"


def test_difficulty_agrees_with_official_parse(dev_sample):
    examples = json.loads(dev_sample.read_text())
    disagree = [(ex["query"], _official_hardness(ex["sql"]), difficulty(ex["query"])) for ex in examples
                if _official_hardness(ex["sql"]) != difficulty(ex["query"])]
    assert disagree == []
