"""The rating web app behind `python -m gpt4llm.humaneval`: FastAPI on uvicorn, two plain HTML pages with a little
JavaScript (gpt4llm/rating/static/).

    GET  /                                  the start page: a rater enters a name (the same name resumes)
    POST /api/raters          {"name"}      -> {"token", "url": "/rate/<token>"}
    GET  /rate/<token>                      the rating page
    GET  /api/rate/<token>/items/<k>        the rater's k-th item (k=-1: where they left off): instruction, input,
                                            answers as A and B, their earlier vote
    POST /api/rate/<token>/items/<k>/vote   {"choices": {criterion: "A"|"tie"|"B"}, "comment", "seconds"}

The page never learns which model wrote which answer: the server keeps the order (Study.shown_order) and records it
with the vote. Items are dealt to raters least-shown first (ties broken by a per-rater random rank), so raters spread
over the items and a second rater on an item comes only when every item has a first one; a rater never gets a task
twice; with votes_per_item set, a task shown that many times is dealt to nobody else.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from gpt4llm.app.http import WebServer
from gpt4llm.rating.store import VoteStore
from gpt4llm.rating.study import Study

CHOICES = ("A", "tie", "B")


def count(n: int, noun: str) -> str:
    """'1 item', '2 items'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class NewRater(BaseModel):
    name: str = Field(min_length=1, max_length=80)


class Vote(BaseModel):
    choices: dict[str, str]
    comment: str = Field(default="", max_length=5000)
    seconds: float | None = Field(default=None, ge=0)


class Rating:
    """What the pages ask for, in terms of the study and its store."""

    def __init__(self, study: Study, store: VoteStore, votes_per_item: int | None = None):
        self.study, self.store, self.votes_per_item = study, store, votes_per_item

    def rater(self, token: str) -> str:
        name = self.store.rater_name(token)
        if name is None:
            raise HTTPException(404, "unknown rater link: start again from the study's start page")
        return name

    def _choose(self, rater: str):
        def pick(mine: set[int], counts: dict[int, int]) -> int | None:
            open_tasks = [
                t
                for t in self.study.tasks
                if t.index not in mine and (self.votes_per_item is None or counts.get(t.index, 0) < self.votes_per_item)
            ]
            if not open_tasks:
                return None
            return min(open_tasks, key=lambda t: (counts.get(t.index, 0), self.study.preference(rater, t))).index

        return pick

    def task_at(self, rater: str, position: int, deal: bool):
        assigned = self.store.assigned(rater)
        if position < len(assigned):
            return self.study.tasks[assigned[position]]
        if position > len(assigned) or not deal:
            raise HTTPException(404, f"item {position + 1} is not yours yet: rate item {len(assigned) + 1} first")
        index = self.store.assign_next(rater, self._choose(rater))
        return None if index is None else self.study.tasks[index]

    def item(self, token: str, position: int) -> dict:
        rater = self.rater(token)
        rated = {vote["task"]: vote for vote in self.store.latest_votes(rater)}
        if position < 0:  # where the rater left off: every task before it has their vote
            position = len(rated)
        total = len(self.study.tasks)
        progress = {"position": position, "rated": len(rated), "total": total, "rater": rater}
        task = self.task_at(rater, position, deal=True)
        if task is None:  # `position` is one past the last item here: the page must not say "item 5 of 4"
            done = "all items rated" if len(rated) == total else "no more items for you: the rest went to other raters"
            return progress | {
                "finished": True,
                "heading": f"{rater} · {done} · {len(rated)} of {total} rated",
                "message": f"You rated {count(len(rated), 'item')}. You can close this page.",
            }
        item = self.study.items[task.item]
        shown = self.study.shown_order(rater, task)
        vote = rated.get(task.index)
        return progress | {
            "finished": False,
            "heading": f"{rater} · item {position + 1} of {total} · {len(rated)} rated",
            "instruction": item["instruction"],
            "input": item["input"],
            "answers": [item["answers"][model] for model in shown],
            "criteria": [[name, definition] for name, definition in self.study.criteria.items()],
            "vote": {"choices": vote["choices"], "comment": vote["comment"]} if vote else None,
        }

    def vote(self, token: str, position: int, vote: Vote) -> dict:
        rater = self.rater(token)
        task = self.task_at(rater, position, deal=False)
        wanted = set(self.study.criteria)
        if set(vote.choices) != wanted or any(c not in CHOICES for c in vote.choices.values()):
            raise HTTPException(422, f"choices: one of {list(CHOICES)} for each of {sorted(wanted)}")
        shown = self.study.shown_order(rater, task)
        self.store.add_vote(rater, task.index, task.item, shown, vote.choices, vote.comment, vote.seconds)
        return {"saved": True, "next": position + 1}


def build_app(rating: Rating) -> FastAPI:
    app = FastAPI(title="gpt4llm human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    static = files("gpt4llm.rating") / "static"
    start_page, rate_page = (static / "start.html").read_text("utf-8"), (static / "rate.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    def start():
        return start_page

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/api/raters")
    def new_rater(body: NewRater):
        token = rating.store.rater_token(body.name.strip() or body.name)
        return {"token": token, "url": f"/rate/{token}"}

    @app.get("/rate/{token}", response_class=HTMLResponse)
    def rate(token: str):
        if rating.store.rater_name(token) is None:
            return RedirectResponse("/")
        return rate_page

    @app.get("/api/rate/{token}/items/{position}")
    def item(token: str, position: int):
        return rating.item(token, position)

    @app.post("/api/rate/{token}/items/{position}/vote")
    def vote(token: str, position: int, body: Vote):
        return rating.vote(token, position, body)

    return app


class RatingServer(WebServer):
    def __init__(self, rating: Rating, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.rating = rating
        self.url = f"http://{host}:{self.port}"

    def build_app(self):
        return build_app(self.rating)
