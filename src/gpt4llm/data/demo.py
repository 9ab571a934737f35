"""The built-in demo: learnable instruction tasks in Alpaca format, so the whole pipeline runs offline on CPU.

Every task has one exact answer that follows from the prompt alone (sorting, counting, reversing, copying a field,
comparing numbers, telling parity and language; in English and Chinese, with and without `input`), so a few minutes
of training on a tiny model take held-out exact match from zero to far above it. Deterministic by seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from gpt4llm.errors import ConfigError
from gpt4llm.io import json_files

WORDS = (
    "apple river stone cloud green tiger piano garden silver window rocket candle forest orange mirror planet "
    "coffee pencil rabbit summer winter yellow castle dragon button jacket lemon monkey needle ocean paper "
    "quiet robot sugar tunnel violet wagon zebra bridge circle desert engine flower guitar harbor island"
).split()
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Kate Leo Mia Noah Olivia Paul".split()
CITIES = "Paris London Tokyo Berlin Madrid Rome Cairo Lima Oslo Seoul Delhi Sydney".split()
ZH_WORDS = "学习 朋友 太阳 月亮 苹果 老师 学生 城市 音乐 电脑 花园 火车 天空 大海 故事 世界 春天 秋天 熊猫 咖啡".split()
ZH_NAMES = "小明 小红 小刚 小丽 王伟 李娜 张强 刘洋".split()
ZH_CITIES = "北京 上海 广州 深圳 成都 杭州 南京 西安".split()


def _sort_numbers(rng: random.Random) -> dict[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return {
        "instruction": "Sort the numbers in ascending order.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _larger(rng: random.Random) -> dict[str, str]:
    a, b = rng.sample(range(100), 2)
    return {"instruction": f"Which number is larger, {a} or {b}?", "input": "", "output": str(max(a, b))}


def _reverse_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"instruction": "Reverse the order of the words.", "input": " ".join(words), "output": " ".join(words[::-1])}


def _count_words(rng: random.Random) -> dict[str, str]:
    words = rng.choices(WORDS, k=rng.randint(1, 9))
    return {"instruction": "How many words are in the text?", "input": " ".join(words), "output": str(len(words))}


def _copy_field(rng: random.Random) -> dict[str, str]:
    fields = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "age": str(rng.randint(18, 90))}
    field = rng.choice(list(fields))
    return {
        "instruction": f"Copy the {field} from the record.",
        "input": "; ".join(f"{k}: {v}" for k, v in fields.items()),
        "output": fields[field],
    }


def _language(rng: random.Random) -> dict[str, str]:
    chinese = rng.random() < 0.5
    words = rng.choices(ZH_WORDS if chinese else WORDS, k=rng.randint(2, 6))
    return {
        "instruction": "Which language is the text written in?",
        "input": ("" if chinese else " ").join(words),
        "output": "Chinese" if chinese else "English",
    }


def _parity(rng: random.Random) -> dict[str, str]:
    n = rng.randint(0, 999)
    return {"instruction": f"Is {n} an even or an odd number?", "input": "", "output": "odd" if n % 2 else "even"}


def _zh_parity(rng: random.Random) -> dict[str, str]:
    n = rng.randint(0, 999)
    return {"instruction": "这个数是奇数还是偶数？", "input": str(n), "output": "奇数" if n % 2 else "偶数"}


def _zh_reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(ZH_WORDS, rng.randint(2, 5))
    return {"instruction": "把这些词语的顺序倒过来。", "input": "、".join(words), "output": "、".join(words[::-1])}


def _zh_count(rng: random.Random) -> dict[str, str]:
    words = rng.choices(ZH_WORDS, k=rng.randint(1, 8))
    return {"instruction": f"下面有几个词语？{'、'.join(words)}", "input": "", "output": f"{len(words)}个"}


def _zh_copy_field(rng: random.Random) -> dict[str, str]:
    fields = {"姓名": rng.choice(ZH_NAMES), "城市": rng.choice(ZH_CITIES), "年龄": str(rng.randint(18, 90))}
    field = rng.choice(list(fields))
    return {
        "instruction": f"从记录中找出{field}。",
        "input": "；".join(f"{k}：{v}" for k, v in fields.items()),
        "output": fields[field],
    }


# Some answers come from a small closed set (language, parity, counts), the others must be copied or compared from
# the prompt: the first kind a tiny model learns within minutes, the second takes it longer.
TASKS = (
    _sort_numbers,
    _larger,
    _reverse_words,
    _count_words,
    _copy_field,
    _language,
    _parity,
    _zh_parity,
    _zh_reverse,
    _zh_count,
    _zh_copy_field,
)


def make_demo_records(num_records: int, seed: int = 0) -> list[dict[str, str]]:
    """`num_records` distinct Alpaca records, the tasks in turn, each drawn from a generator seeded by `seed`."""
    rng = random.Random(seed)
    records, seen = [], set()
    for i in range(num_records):
        task = TASKS[i % len(TASKS)]
        for _ in range(1000):  # distinct prompts, so a held-out record was never seen in training
            record = task(rng)
            key = (record["instruction"], record["input"])
            if key not in seen:
                break
        else:
            raise ConfigError(f"demo: {task.__name__} has no new prompt left after {i} records; ask for fewer")
        seen.add(key)
        records.append(record)
    return records


def write_demo_file(path: str | Path, num_records: int = 4000, seed: int = 0) -> Path:
    """Writes the demo records as an Alpaca JSON file (atomically: a reader never sees half a file)."""
    return json_files.write_json(path, make_demo_records(num_records, seed), indent=1)
