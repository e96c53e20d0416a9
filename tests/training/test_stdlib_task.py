"""The "which package?" task from the standard library: deterministic, split by file, balanced."""

import pytest

from qkv.training.stdlib_task import package_files, package_task

PACKAGES = ("json", "html", "http")  # small packages: the test reads a dozen files


def test_deterministic_and_split_by_file():
    task = package_task(PACKAGES, train_per_class=30, test_per_class=10)
    again = package_task(PACKAGES, train_per_class=30, test_per_class=10)
    assert task == again
    assert not set(task.train_files) & set(task.test_files)  # no file gives examples to both splits
    assert not set(task.train.texts) & set(task.test.texts)
    assert set(task.train.labels) == set(task.test.labels) == set(PACKAGES)
    for package in PACKAGES:
        assert 0 < task.train.labels.count(package) <= 30 and 0 < task.test.labels.count(package) <= 10
    assert all(text.startswith(("def ", "async def ")) and len(text) <= 400 for text in task.train.texts)


def test_package_files_skip_test_suites_and_unknown_packages_fail():
    files = package_files("unittest")
    assert files and not any("test" in part for f in files for part in f.parts[-3:-1] if part != "unittest")
    with pytest.raises(FileNotFoundError, match="not a standard-library package"):
        package_files("no_such_package")
