"""Schema-based SQL repair: hand-written broken queries on real Spider databases (the demo's), each checked by executing
the repair against a hand-written correct query; ambiguous or valid queries are left alone."""
import pytest

from conftest import demo_db
from route.database import open_database
from route.evaluate import results_match
from route.repair import repair

CASES = [  # (database, broken query, a correct query the repair must agree with)
    ("concert_singer",  # a real column under the wrong alias: only T1's table has Name
     "SELECT T2.Name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.Singer_ID = T2.Singer_ID",
     "SELECT T1.Name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.Singer_ID = T2.Singer_ID"),
    ("concert_singer",  # the same, three tables deep
     "SELECT T1.Name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.Singer_ID = T2.Singer_ID "
     "JOIN concert AS T3 ON T2.concert_ID = T3.concert_ID WHERE T1.concert_Name = 'Auditions'",
     "SELECT T1.Name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.Singer_ID = T2.Singer_ID "
     "JOIN concert AS T3 ON T2.concert_ID = T3.concert_ID WHERE T3.concert_Name = 'Auditions'"),
    ("concert_singer", "SELECT Song_Nam FROM singer WHERE Age > 30",  # near-miss column
     "SELECT Song_Name FROM singer WHERE Age > 30"),
    ("concert_singer", "SELECT count(*) FROM singers",  # near-miss table
     "SELECT count(*) FROM singer"),
    ("concert_singer", "SELECT Name FROM singer WHERE Age > (SELECT avg(Agee) FROM singer)",  # in a subquery
     "SELECT Name FROM singer WHERE Age > (SELECT avg(Age) FROM singer)"),
    ("concert_singer", "SELECT concert_Name FROM singer_in_concert WHERE Singer_ID = 2",  # a forgotten join
     "SELECT T2.concert_Name FROM singer_in_concert AS T1 JOIN concert AS T2 ON T1.concert_ID = T2.concert_ID "
     "WHERE T1.Singer_ID = 2"),
    ("pets_1", "SELECT StuID, PetType FROM Has_Pet WHERE weight > 10",  # ... which makes StuID need its table
     "SELECT T1.StuID, T2.PetType FROM Has_Pet AS T1 JOIN Pets AS T2 ON T1.PetID = T2.PetID WHERE T2.weight > 10"),
    ("pets_1", "SELECT T1.Fname FROM Student AS T1 JOIN Has_Pet AS T2",  # join key from the foreign key
     "SELECT T1.Fname FROM Student AS T1 JOIN Has_Pet AS T2 ON T1.StuID = T2.StuID"),
    ("pets_1", "SELECT T3.PetType FROM Student AS T1 JOIN Has_Pet AS T2 ON T1.StuID = T2.StuID "
               "JOIN Pets AS T3 WHERE T1.Fname = 'Linda'",
     "SELECT T3.PetType FROM Student AS T1 JOIN Has_Pet AS T2 ON T1.StuID = T2.StuID "
     "JOIN Pets AS T3 ON T2.PetID = T3.PetID WHERE T1.Fname = 'Linda'"),
]

UNTOUCHED = [  # nothing unambiguous to repair: None
    ("concert_singer", "SELECT T3.Name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.Singer_ID = "
                       "T2.Singer_ID JOIN stadium AS T4 ON T4.Stadium_ID = 1 JOIN concert AS T3 ON 1"),  # 2 owners
    ("concert_singer", "SELECT count(*) AS cnt, Country FROM singer GROUP BY Country ORDER BY cnt"),  # valid
    ("concert_singer", "SELECT Name FROM singer AS S WHERE EXISTS "
                       "(SELECT 1 FROM singer_in_concert WHERE Singer_ID = S.Singer_ID)"),  # correlated
    ("concert_singer", "SELECT T1.x FROM (SELECT Name FROM singer) AS T1"),  # a derived table: not guessed
    ("concert_singer", "SELECT title FROM singer"),  # no close name, no table has it
    ("concert_singer", "SELECT Capacity FROM singer"),  # stadium has it, but no foreign key links it to singer
    ("concert_singer", "this is not SQL ,,,"),
    ("concert_singer", ""),
]


@pytest.mark.parametrize("db_id,broken,correct", CASES)
def test_repairs_run_and_agree_with_the_correct_query(db_id, broken, correct):
    db = open_database(demo_db(db_id))
    assert db.execute(broken).error is not None or "ON" not in broken.split("JOIN")[-1]  # broken as written
    fixed = repair(broken, db)
    assert fixed is not None
    got, want = db.execute(fixed), db.execute(correct)
    assert got.error is None and want.error is None and want.rows
    assert results_match(got.rows, want.rows, ordered=False)


@pytest.mark.parametrize("db_id,sql", UNTOUCHED)
def test_ambiguous_or_valid_queries_are_left_alone(db_id, sql):
    assert repair(sql, open_database(demo_db(db_id))) is None
