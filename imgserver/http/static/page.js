// The status page: reads everything from the API, follows the event streams with fetch (so
// that a token can go in a header, never in a URL), and keeps the token for the tab only.
"use strict";

const TOKEN_KEY = "imgserver-token";
const PAGE_SIZE = 50;          // jobs per page of the list
const IMAGES_PER_PAGE = 100;   // images rendered at a time on a job's page
const FINAL = ["done", "failed", "cancelled"];

// -- the API -----------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    await askToken(token ? "That token was refused." : "");
    return api(path, options);
  }
  return response;
}

let asking = null;
function askToken(message) {
  // One prompt for every request that needs it; the page shows nothing until it is given.
  document.getElementById("content").hidden = true;
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const form = document.createElement("form");
    form.className = "token";
    form.innerHTML = `<strong>This server needs a token</strong>
      <label>Token <input type="password" name="token" autocomplete="off" required></label>
      <span class="error"></span><button>Open</button>
      <span class="muted">Kept for this browser tab only.</span>`;
    form.querySelector(".error").textContent = message;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, form.elements.token.value.trim());
      form.remove();
      asking = null;
      resolve();
    });
    document.body.appendChild(form);
    form.elements.token.focus();
  });
  return asking;
}

async function json(path, options) {
  const response = await api(path, options);
  if (!response.ok && response.status !== 409) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// Follows a Server-Sent Events stream, resuming after the last event when it drops.
// Returns when the server ends the stream after a final event (`stop` says which).
async function follow(path, onEvent, stop) {
  let lastId = null;
  const live = document.getElementById("live");
  for (;;) {
    try {
      const response = await api(path, { headers: lastId ? { "Last-Event-ID": lastId } : {} });
      if (!response.ok) throw new Error(`${path}: ${response.status}`);
      live.classList.add("on");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = { name: "message", data: "" };
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) event.name = line.slice(7);
            else if (line.startsWith("data: ")) event.data += line.slice(6);
            else if (line.startsWith("id: ")) lastId = line.slice(4);
          }
          if (!event.data) continue;  // a keep-alive comment
          const data = JSON.parse(event.data);
          onEvent(event.name, data);
          if (stop && stop(event.name)) return;
        }
      }
    } catch (error) {
      console.warn(error);
    }
    live.classList.remove("on");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// -- shared rendering ----------------------------------------------------------------------

function text(element, value) { element.textContent = value == null ? "" : String(value); }

function time(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function setBar(bar, progress) {
  const share = progress.total ? progress.done / progress.total : 0;
  bar.firstElementChild.style.width = `${Math.round(share * 100)}%`;
  bar.lastElementChild.textContent = `${progress.done}/${progress.total}`;
  bar.dataset.done = progress.done;
  bar.dataset.total = progress.total;
}

function bar(progress) {
  const element = document.createElement("div");
  element.className = "bar";
  element.append(document.createElement("div"), document.createElement("span"));
  setBar(element, progress);
  return element;
}

function setState(element, state) {
  element.className = `state ${state}`;
  element.textContent = state;
}

// -- the jobs list -------------------------------------------------------------------------

async function jobsPage() {
  const rows = new Map();
  const tbody = document.querySelector("#jobs tbody");
  const select = document.getElementById("state");
  const more = document.getElementById("more");
  const params = new URLSearchParams(location.search);
  select.value = params.get("state") || "";
  let cursor = null;

  const wanted = (state) => !select.value || select.value === state;

  function row(job, atTop) {
    let tr = rows.get(job.id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.job = job.id;
      tr.innerHTML = `<td><a></a></td><td><span class="state"></span></td><td class="source">
        </td><td class="progress"></td><td class="created"></td><td class="started"></td>
        <td class="finished"></td><td class="error"></td>`;
      const link = tr.querySelector("a");
      link.href = `/ui/jobs/${encodeURIComponent(job.id)}`;
      text(link, job.id);
      tr.querySelector(".progress").appendChild(bar(job.progress));
      rows.set(job.id, tr);
      if (atTop) tbody.prepend(tr); else tbody.append(tr);
    }
    update(tr, job);
    document.getElementById("empty").hidden = rows.size > 0;
  }

  function update(tr, job) {
    if (job.state) setState(tr.querySelector(".state"), job.state);
    if (job.progress) setBar(tr.querySelector(".bar"), job.progress);
    if (job.source) text(tr.querySelector(".source"), job.source);
    if (job.created_at) text(tr.querySelector(".created"), time(job.created_at));
    if ("started_at" in job) text(tr.querySelector(".started"), time(job.started_at));
    if ("finished_at" in job) text(tr.querySelector(".finished"), time(job.finished_at));
    if ("error" in job) text(tr.querySelector(".error"), job.error);
  }

  async function load() {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    if (select.value) query.set("state", select.value);
    if (cursor) query.set("cursor", cursor);
    const page = await json(`/jobs?${query}`);
    document.getElementById("content").hidden = false;
    for (const job of page.jobs) row(job, false);
    cursor = page.next;
    more.hidden = !cursor;
    document.getElementById("empty").hidden = rows.size > 0;
  }

  select.addEventListener("change", () => {
    const query = select.value ? `?state=${select.value}` : "";
    history.replaceState(null, "", `/ui${query}`);
    rows.clear();
    tbody.replaceChildren();
    cursor = null;
    load();
  });
  more.addEventListener("click", load);

  await load();
  follow("/events", (name, data) => {
    const tr = rows.get(data.job);
    if (name === "job") {
      if (wanted(data.state)) row(data, true);
    } else if (name === "status" || name === "end") {
      if (tr || wanted(data.state)) row(data, !tr);
    } else if (tr && (name === "state" || name === "image")) {
      update(tr, name === "state" ? data : { progress: data.progress });
    }
  });
}

// -- a job's page --------------------------------------------------------------------------

async function jobPage() {
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const list = document.getElementById("images");
  const more = document.getElementById("more");
  const cancel = document.getElementById("cancel");
  let job = null;
  let shown = 0;

  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (entry.isIntersecting) {
        observer.unobserve(entry.target);
        loadThumbnail(entry.target);
      }
    }
  }, { rootMargin: "300px" });

  function header() {
    text(document.getElementById("title"), job.id);
    document.title = `imgserver — ${job.id}`;
    setState(document.getElementById("state"), job.state);
    text(document.getElementById("source"), `from ${job.source}`);
    setBar(document.querySelector(".summary .bar"), job.progress);
    const times = document.getElementById("times");
    times.replaceChildren();
    for (const [label, value] of [["created", job.created_at], ["started", job.started_at],
                                  ["finished", job.finished_at], ["kept until", job.expires_at]]) {
      if (!value) continue;
      const div = document.createElement("div");
      div.innerHTML = "<dt></dt><dd></dd>";
      text(div.firstChild, label);
      text(div.lastChild, time(value));
      times.appendChild(div);
    }
    const error = document.getElementById("error");
    text(error, job.error);
    error.hidden = !job.error;
    text(document.getElementById("operations"), job.operations.join(", ") || "none");
    cancel.hidden = FINAL.includes(job.state);
  }

  function thumbnail(index, output, label) {
    const img = document.createElement("img");
    img.alt = label;
    img.title = label;
    img.dataset.src = `/jobs/${encodeURIComponent(job.id)}/images/${index}`;
    if (output !== null) img.dataset.output = output;
    img.addEventListener("click", () => openFull(img));
    observer.observe(img);
    return img;
  }

  // A split's tiles are listed nested (_lt_lt, _lt_rt, _lt_lb, _lt_rb, _rt_lt, ...): tile n
  // of 4^k sits at the column and row its base-4 digits say, outermost split first.
  function place(img, number, splits) {
    let column = 0, row = 0;
    for (let level = splits - 1; level >= 0; level--) {
      const quadrant = Math.floor(number / 4 ** level) % 4;
      column = column * 2 + (quadrant % 2);
      row = row * 2 + Math.floor(quadrant / 2);
    }
    img.style.gridColumn = String(column + 1);
    img.style.gridRow = String(row + 1);
  }

  function item(index) {
    const image = job.images[index];
    let li = list.children[index];
    if (!li) {
      li = document.createElement("li");
      li.dataset.index = index;
      li.innerHTML = `<div class="head"><span class="index"></span><span class="input"></span>
        <span class="state"></span></div><p class="error" hidden></p>
        <div class="pair"><figure class="source"><figcaption>input</figcaption></figure>
        <figure class="results"><figcaption>output</figcaption><div class="thumbs"></div>
        </figure></div>`;
      text(li.querySelector(".index"), `#${index}`);
      li.querySelector(".source").appendChild(thumbnail(index, null, image.input));
      list.appendChild(li);
    }
    text(li.querySelector(".input"), `${image.input} → ${image.output}`);
    setState(li.querySelector(".state"), image.state);
    const error = li.querySelector(".error");
    text(error, image.error);
    error.hidden = !image.error;
    const thumbs = li.querySelector(".thumbs");
    if (thumbs.children.length !== image.outputs.length) {
      thumbs.replaceChildren();
      const count = image.outputs.length;
      const splits = count > 1 ? Math.round(Math.log(count) / Math.log(4)) : 0;
      const tiled = splits > 0 && 4 ** splits === count;
      thumbs.classList.toggle("tiles", tiled);
      thumbs.style.setProperty("--columns", tiled ? String(2 ** splits) : "");
      text(li.querySelector(".results figcaption"), tiled
        ? `${count} tiles, in place` : count === 1 ? "output" : `${count} outputs`);
      image.outputs.forEach((output, number) => {
        const img = thumbnail(index, number, output);
        if (tiled) place(img, number, splits);
        thumbs.appendChild(img);
      });
    }
  }

  function renderMore() {
    const until = Math.min(job.images.length, shown + IMAGES_PER_PAGE);
    for (; shown < until; shown++) item(shown);
    more.hidden = shown >= job.images.length;
  }

  function render() {
    header();
    for (let index = 0; index < shown; index++) item(index);
    if (shown === 0) renderMore();
    document.getElementById("content").hidden = false;
  }

  // Which file of the image: an output's number, or none for its input.
  function which(img, extra = {}) {
    const params = new URLSearchParams(extra);
    if (img.dataset.output !== undefined) params.set("output", img.dataset.output);
    const query = params.toString();
    return query ? `?${query}` : "";
  }

  async function loadThumbnail(img) {
    const size = img.closest(".tiles") ? { size: "128" } : {};
    const response = await api(`${img.dataset.src}/thumbnail${which(img, size)}`);
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
    else img.alt = `${img.alt}: no thumbnail (${response.status})`;
  }

  async function openFull(img) {
    const response = await api(`${img.dataset.src}/file${which(img)}`);
    if (!response.ok) return;
    const viewer = document.getElementById("viewer");
    viewer.querySelector("img").src = URL.createObjectURL(await response.blob());
    viewer.hidden = false;
  }

  document.getElementById("viewer").addEventListener("click", (event) => {
    event.currentTarget.hidden = true;
  });
  more.addEventListener("click", renderMore);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    const document_ = await json(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    job = document_;
    render();
    cancel.disabled = false;
  });

  const response = await api(`/jobs/${encodeURIComponent(jobId)}`);
  if (response.status === 404) {
    document.getElementById("content").hidden = false;
    document.querySelector("main").textContent = `No job ${jobId}.`;
    return;
  }
  job = await response.json();
  render();
  if (FINAL.includes(job.state)) return;
  follow(`/jobs/${encodeURIComponent(jobId)}/events`, (name, data) => {
    if (name === "status" || name === "end") {
      job = data;
      render();
    } else if (name === "image") {
      job.images[data.index] = data.image;
      job.progress = data.progress;
      header();
      if (data.index < shown) item(data.index);
    } else if (name === "state") {
      job.state = data.state;
      job.progress = data.progress;
      header();
    }
  }, (name) => name === "end");
}

if (document.body.dataset.page === "jobs") jobsPage();
else jobPage();
