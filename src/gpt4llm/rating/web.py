"""The rating web app behind `python -m gpt4llm.humaneval`: FastAPI on uvicorn, two plain HTML pages with a little
JavaScript (gpt4llm/rating/static/).

    GET  /                                  the start page: a new rater enters a name
    POST /api/raters          {"name"}      -> {"token", "url": "/rate/<token>"}; 409 for a name already taken,
                                            unless the study has open sign-up (then the name resumes, with a
                                            new link beside the rater's others)
    GET  /rate/<token>                      the rating page
    GET  /api/rate/<token>/items/<k>        the rater's k-th item (k=-1: where they left off): the task shown,
                                            instruction, input, answers as A and B, their earlier vote
    POST /api/rate/<token>/items/<k>/vote   {"task", "choices": {criterion: "A"|"tie"|"B"}, "comment", "seconds"}

Access: a rater's link (/rate/<token>, an unguessable token) is their key; a name is only a label. The store keeps
only the token's digest, so a link is shown once, when it is made. The start page makes new raters; a name already
taken (compared after store.normal_name: look-alikes with invisible characters or full-width letters are the same
name) is refused, so nobody reads or overrides someone else's votes by typing their name (a study made with
open_signup=true lets the same name resume, and its report says so).

The page never learns which model wrote which answer: the server keeps the order (Study.shown_order) and records it
with the vote. Items are dealt to raters least-shown first (ties broken by a per-rater random rank), so raters spread
over the items and a second rater on an item comes only when every item has a first one; a rater never gets a task
twice; with votes_per_item set, a task shown that many times is dealt to nobody else. Dealing a position is one
transaction, and a vote names the task it was shown for: a vote from a page whose position now holds another task (a
second tab) is refused, not stored against the other task.
"""

from __future__ import annotations

import ipaddress
import socket
from importlib.resources import files

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field, field_validator

from gpt4llm.app.http import WebServer
from gpt4llm.rating.store import MAX_NAME, VoteStore, normal_name
from gpt4llm.rating.study import Study

CHOICES = ("A", "tie", "B")


def count(n: int, noun: str) -> str:
    """'1 item', '2 items'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class NewRater(BaseModel):
    name: str = Field(max_length=4 * MAX_NAME)

    @field_validator("name")
    @classmethod
    def _normal(cls, name: str) -> str:
        return normal_name(name)


class Vote(BaseModel):
    task: int  # the task the page showed: refused if that position now holds another
    choices: dict[str, str]
    comment: str = Field(default="", max_length=5000)
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Rating:
    """What the pages ask for, in terms of the study and its store."""

    def __init__(self, study: Study, store: VoteStore, votes_per_item: int | None = None):
        self.study, self.store, self.votes_per_item = study, store, votes_per_item

    def rater(self, token: str) -> str:
        name = self.store.rater_name(token)
        if name is None:
            raise HTTPException(404, "unknown rater link: start again from the study's start page")
        return name

    def new_rater(self, name: str) -> str:
        if self.study.open_signup:  # the name resumes: a new link, the rater's earlier ones still work
            return self.store.new_link(name, keep_others=True)
        token = self.store.add_rater(name)
        if token is None:
            raise HTTPException(
                409,
                f"the name {normal_name(name)!r} is taken: if it is yours, go on with your own rating link (the "
                "address of your rating page; if you lost it, the study's organiser can give you a new one); "
                "otherwise choose another name",
            )
        return token

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
        """The task at `position` of rater's sequence, dealing the next one when `deal`; None when nothing is left
        to deal."""
        if not 0 <= position <= len(self.study.tasks):
            raise HTTPException(404, f"item {position + 1}: there is no such item (positions count from 0)")
        index = self.store.deal(rater, position, self._choose(rater) if deal else None)
        if index is not None:
            return self.study.tasks[index]
        dealt = len(self.store.assigned(rater))
        if position != dealt or not deal:
            raise HTTPException(404, f"item {position + 1} is not yours yet: rate item {dealt + 1} first")
        return None

    def item(self, token: str, position: int) -> dict:
        rater = self.rater(token)
        rated = {vote["task"]: vote for vote in self.store.latest_votes(rater)}
        if position == -1:  # where the rater left off: every task before it has their vote
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
            "task": task.index,
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
        if vote.task != task.index:
            raise HTTPException(
                409,
                f"item {position + 1} is another item than this page showed (opened twice?): reload the page; "
                "nothing was saved",
            )
        wanted = set(self.study.criteria)
        if set(vote.choices) != wanted or any(c not in CHOICES for c in vote.choices.values()):
            raise HTTPException(422, f"choices: one of {list(CHOICES)} for each of {sorted(wanted)}")
        shown = self.study.shown_order(rater, task)
        self.store.add_vote(rater, task.index, task.item, shown, vote.choices, vote.comment, vote.seconds)
        return {"saved": True, "next": position + 1}


def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field and what is wrong, without echoing the input back: FastAPI's own answer repeats it, and
    a NaN or a lone surrogate in it cannot be written as JSON (a 500 instead of the 422)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}".encode("utf-8", "replace").decode("utf-8"))
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def build_app(rating: Rating) -> FastAPI:
    app = FastAPI(title="gpt4llm human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(RequestValidationError, _invalid)
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
        token = rating.new_rater(body.name)
        return {"token": token, "url": f"/rate/{token}"}

    @app.get("/rate/{token}", response_class=HTMLResponse)
    def rate(token: str):
        if rating.store.rater_name(token) is None:
            return RedirectResponse("/")
        return rate_page

    @app.get("/api/rate/{token}/items/{position}")
    def item(token: str, position: int = PathParam(ge=-1)):
        return rating.item(token, position)

    @app.post("/api/rate/{token}/items/{position}/vote")
    def vote(token: str, body: Vote, position: int = PathParam(ge=0)):
        return rating.vote(token, position, body)

    return app


def reachable_host(host: str) -> str | None:
    """The address to print in links for a server listening on `host`: itself, or for a wildcard (0.0.0.0, ::)
    this machine's address on its default route (None when there is none: no network)."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host  # a name: raters use it as given
    if not wildcard:
        return host
    family, probe = (socket.AF_INET6, "2001:db8::1") if ":" in host else (socket.AF_INET, "192.0.2.1")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((probe, 9))  # picks the outgoing interface; a UDP connect sends nothing
            address = udp.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_unspecified else address


class RatingServer(WebServer):
    def __init__(self, rating: Rating, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.rating = rating
        self.reachable = reachable_host(host)
        shown = self.reachable or host
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{self.port}"

    def build_app(self):
        return build_app(self.rating)
