// mailmoat review page: blocked sessions (paged), one session's story, unban /
// allow (and take out again, also an entry listed before) / label.
//
// Everything shown comes from the admin API (docs/admin.md) and much of it from
// the attacker (user names, HELO names, transcripts): it only ever reaches the
// page as text (textContent, text nodes), never as markup.
"use strict";

(function () {
  const TOKEN_KEY = "mailmoat.admin.token";
  const FILTERS = ["protocol", "rule", "user", "ip", "country"];
  const RANGES = ["1h", "24h", "7d", "custom"];
  const DEFAULT_RANGE = "24h";
  // the most events GET /api/events returns at once (the API's MAX_EVENT_LIMIT)
  const MAX_LIMIT = 10000;

  const $ = (id) => document.getElementById(id);

  // -- DOM helpers: text only ------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function show(id) {
    for (const section of ["login", "list-view", "detail-view"]) {
      $(section).hidden = section !== id;
    }
    $("logout").hidden = id === "login";
  }

  function setStatus(node, text, kind) {
    node.textContent = text;
    node.className = "status" + (kind ? " " + kind : "");
  }

  function display(value) {
    if (value === null || value === undefined || value === "") return "\u2014";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function when(stamp) {
    if (typeof stamp !== "string") return display(stamp);
    return stamp.replace("T", " ").replace(/\.\d+Z$|Z$/, "");
  }

  // -- the token and the API -------------------------------------------------------

  class Unauthorized extends Error {}

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function showLogin(message) {
    show("login");
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    const input = $("token");
    input.value = "";
    input.focus();
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + token() };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (exc) {
      return { ok: false, status: 0, data: null, error: "cannot reach the node: " + exc.message };
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_exc) {
      data = null;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("Wrong token: the node refused it (401 Unauthorized). Enter the admin token again.");
      throw new Unauthorized();
    }
    const error =
      data && typeof data.error === "string" ? data.error : response.statusText || "failed";
    return { ok: response.ok, status: response.status, data, error };
  }

  // -- the URL hash: filters and the session shown -----------------------------------

  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const state = { range: DEFAULT_RANGE, since: "", until: "", session: "" };
    for (const name of FILTERS) state[name] = (params.get(name) || "").trim();
    const range = params.get("range");
    if (range && RANGES.includes(range)) state.range = range;
    if (state.range === "custom") {
      state.since = (params.get("since") || "").trim();
      state.until = (params.get("until") || "").trim();
    }
    // the page size of the list in events (default: the API's, 1000)
    const limit = (params.get("limit") || "").trim();
    state.limit = /^[1-9][0-9]{0,4}$/.test(limit) && Number(limit) <= MAX_LIMIT ? limit : "";
    state.session = (params.get("session") || "").trim();
    return state;
  }

  function hashOf(state) {
    const params = new URLSearchParams();
    for (const name of FILTERS) if (state[name]) params.set(name, state[name]);
    params.set("range", state.range || DEFAULT_RANGE);
    if (state.range === "custom") {
      if (state.since) params.set("since", state.since);
      if (state.until) params.set("until", state.until);
    }
    if (state.limit) params.set("limit", state.limit);
    if (state.session) params.set("session", state.session);
    return "#" + params.toString();
  }

  function go(state) {
    const hash = hashOf(state);
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  // -- the list of blocked sessions ------------------------------------------------------

  function fillFilters(state) {
    for (const name of FILTERS) $("f-" + name).value = state[name];
    $("f-range").value = state.range;
    $("f-since").value = state.since;
    $("f-until").value = state.until;
    showCustom();
  }

  function showCustom() {
    const custom = $("f-range").value === "custom";
    for (const node of document.querySelectorAll("#filters .custom")) node.hidden = !custom;
  }

  function filtersFromForm() {
    const state = readHash();
    for (const name of FILTERS) state[name] = $("f-" + name).value.trim();
    state.range = $("f-range").value;
    state.since = state.range === "custom" ? $("f-since").value.trim() : "";
    state.until = state.range === "custom" ? $("f-until").value.trim() : "";
    state.session = "";
    return state;
  }

  // the query of one page: `until` and `limit` set the page (the first page: neither)
  function eventsQuery(state, until, limit) {
    const params = new URLSearchParams({ blocked: "true" });
    for (const name of FILTERS) if (state[name]) params.set(name, state[name]);
    if (state.range !== "custom") params.set("since", state.range);
    else {
      if (state.since) params.set("since", state.since);
      if (state.until && !until) params.set("until", state.until);
    }
    // an older page ends where the pages before it did, so before the form's `until` too
    if (until) params.set("until", until);
    if (limit) params.set("limit", String(limit));
    return "/api/events?" + params.toString();
  }

  function stampMs(e) {
    return typeof e["@timestamp"] === "string" ? Date.parse(e["@timestamp"]) : NaN;
  }

  // What the list shows: one row per session, newest first, merged across pages.
  //
  // The events come newest first, so a session first seen on a later page is older
  // than every row above it: new rows go at the bottom, a row already there only
  // gains what its older events tell. The next page is the events before the oldest
  // one shown: `until` (which excludes that time itself) is that time plus one
  // millisecond, and the events at exactly that time already shown (`tail.count`,
  // the newest of that millisecond) are the first ones of the answer at that time:
  // they are asked for on top of a page and skipped. So no event is read twice and
  // none is missed however many share a timestamp, and every page brings new ones.
  function newList(state) {
    return {
      state,
      rows: new Map(),
      unnamed: 0,
      events: 0,
      pageSize: 0,
      tail: null, // the oldest time shown (ms) and how many events shown have it
      more: false, // the last page was full: there may be older events
      loading: false,
    };
  }

  let list = null;

  function mergeEvent(l, e) {
    const key = e["session.id"] ? "session " + e["session.id"] : "event " + l.unnamed++;
    let row = l.rows.get(key);
    const fresh = !row;
    if (!row) {
      row = {
        id: e["session.id"] || "",
        time: e["@timestamp"],
        protocol: "",
        ip: "",
        country: "",
        user: "",
        rules: [],
        actions: [],
        close: "",
        tr: null,
      };
      l.rows.set(key, row);
    }
    row.protocol = row.protocol || e["session.protocol"] || "";
    row.ip = row.ip || e["client.ip"] || "";
    row.country = row.country || e["client.geo.country"] || "";
    row.user = row.user || e["auth.user"] || "";
    const rule = e["rule.id"];
    if (rule && !row.rules.includes(rule)) row.rules.push(rule);
    const action = e["verdict.action"];
    if (e["event.kind"] === "verdict" && action && !row.actions.includes(action)) {
      row.actions.push(action);
    }
    // events come newest first: the newest close of the session is the one to show
    if (e["event.action"] === "session.close" && !row.close) row.close = e["session.close_reason"] || "";
    return [row, fresh];
  }

  // add one answer of GET /api/events (`asked` events at most, `skip` of them shown already)
  function addPage(l, events, asked, skip) {
    const touched = new Set();
    const added = [];
    const cursor = l.tail ? l.tail.ms : NaN;
    let skipped = 0;
    for (const e of events) {
      if (skipped < skip && stampMs(e) === cursor) {
        skipped++;
        continue;
      }
      const ms = stampMs(e);
      if (l.tail && ms === l.tail.ms) l.tail.count++;
      else l.tail = { ms, count: 1 };
      l.events++;
      const [row, fresh] = mergeEvent(l, e);
      if (fresh) added.push(row);
      touched.add(row);
    }
    l.more = events.length >= asked;
    return [touched, added];
  }

  // a page can follow when the last one was full and the oldest time shown is a time
  function canPage(l) {
    return l.more && l.tail !== null && Number.isFinite(l.tail.ms) && l.tail.count < MAX_LIMIT;
  }

  function rowElement(row, state) {
    const link = el("a", { href: hashOf({ ...state, session: row.id }) }, row.id || "\u2014");
    const tr = el(
      "tr",
      { "data-session": row.id },
      el("td", { class: "nowrap" }, when(row.time)),
      el("td", {}, display(row.protocol)),
      el("td", { class: "mono" }, display(row.ip)),
      el("td", {}, display(row.country)),
      el("td", { class: "user" }, display(row.user)),
      el("td", { class: "mono" }, row.rules.length ? row.rules.join(", ") : "\u2014"),
      el("td", {}, row.actions.join(", ") || row.close || "\u2014"),
      el("td", { class: "mono" }, link),
    );
    if (row.id) {
      tr.classList.add("clickable");
      tr.addEventListener("click", (event) => {
        if (event.target.closest("a")) return;
        location.hash = hashOf({ ...state, session: row.id });
      });
    }
    return tr;
  }

  // draw the rows a page touched: new ones at the bottom, the others in their place
  function drawRows(l, touched) {
    const tbody = $("sessions").tBodies[0];
    for (const row of touched) {
      const tr = rowElement(row, l.state);
      if (row.tr) row.tr.replaceWith(tr);
      else tbody.append(tr);
      row.tr = tr;
    }
  }

  function listSummary(l) {
    const n = l.rows.size;
    let text = n
      ? n + (n === 1 ? " blocked session" : " blocked sessions")
      : "No blocked sessions match these filters.";
    if (l.more) {
      text +=
        " (the newest " +
        l.events +
        " events only: " +
        (canPage(l) ? "Load older for more, or narrow the filters" : "narrow the filters to see older ones") +
        ")";
    }
    return text;
  }

  function showListEnd(l) {
    setStatus($("list-status"), listSummary(l), l.rows.size ? "" : "empty");
    $("load-older").hidden = !canPage(l);
  }

  async function showList(state) {
    show("list-view");
    fillFilters(state);
    const status = $("list-status");
    const mine = newList(state);
    list = mine;
    $("load-older").hidden = true;
    $("load-older").disabled = false;
    setStatus(status, "Loading\u2026", "");
    const limit = state.limit ? Number(state.limit) : 0;
    const r = await api("GET", eventsQuery(state, "", limit));
    if (mine !== list) return;
    $("sessions").tBodies[0].replaceChildren();
    if (!r.ok) {
      setStatus(status, "The node refused the query (" + r.status + "): " + r.error, "error");
      return;
    }
    const events = Array.isArray(r.data.events) ? r.data.events : [];
    mine.pageSize = Number(r.data.limit) || limit || events.length || 1;
    const [touched] = addPage(mine, events, mine.pageSize, 0);
    drawRows(mine, touched);
    showListEnd(mine);
  }

  async function loadOlder() {
    const mine = list;
    if (!mine || mine.loading || !canPage(mine)) return;
    const button = $("load-older");
    const focused = document.activeElement === button;
    const skip = mine.tail.count;
    const asked = Math.min(mine.pageSize + skip, MAX_LIMIT);
    const until = new Date(mine.tail.ms + 1).toISOString();
    mine.loading = true;
    button.disabled = true;
    setStatus($("list-status"), "Loading older events\u2026", "");
    let r;
    try {
      r = await api("GET", eventsQuery(mine.state, until, asked));
    } catch (exc) {
      if (exc instanceof Unauthorized) return;
      throw exc;
    } finally {
      mine.loading = false;
      if (mine === list) button.disabled = false;
    }
    if (mine !== list) return;
    if (!r.ok) {
      setStatus(
        $("list-status"),
        "Loading older events failed (" + r.status + "): " + r.error + " (the rows shown stay)",
        "error",
      );
      if (focused) button.focus();
      return;
    }
    const events = Array.isArray(r.data.events) ? r.data.events : [];
    const [touched, added] = addPage(mine, events, asked, skip);
    drawRows(mine, touched);
    showListEnd(mine);
    if (!focused) return;
    // keyboard users: stay on the button, or go on to the first row it brought
    const next = added.length ? added[0].tr : $("sessions").tBodies[0].lastElementChild;
    if (!button.hidden) button.focus();
    else if (next) next.querySelector("a").focus();
  }

  // -- one session -----------------------------------------------------------------------

  function kvTable(pairs) {
    const table = el("table", { class: "kv" });
    for (const [key, value] of pairs) {
      table.append(el("tr", {}, el("th", {}, key), el("td", {}, display(value))));
    }
    return table;
  }

  function section(title, ...children) {
    return el("section", { class: "card" }, el("h3", {}, title), ...children);
  }

  function labelList(labels) {
    if (!labels.length) return el("p", { class: "empty" }, "no labels");
    const ul = el("ul", { class: "labels" });
    for (const l of labels) {
      ul.append(
        el(
          "li",
          {},
          el("strong", {}, display(l.label)),
          " by " + display(l.admin_client) + " at " + when(l["@timestamp"]),
          l.note ? el("span", { class: "note" }, ": " + l.note) : null,
        ),
      );
    }
    return ul;
  }

  let current = null;

  function renderSession(data) {
    const s = data.summary || {};
    const client = s.client || {};
    const tls = s.tls || {};
    const close = s.close || {};
    const body = $("d-body");
    body.replaceChildren();

    body.append(
      section(
        "Session",
        kvTable([
          ["protocol", s.protocol],
          ["listener", s.listener],
          ["node", s.node],
          ["start", when(s.start)],
          ["end", when(s.end)],
          ["blocked", s.blocked ? "YES" : "no"],
          ["close reason", close.reason],
          ["duration (ms)", close.duration_ms],
          ["bytes in / out", display(close.client_bytes) + " / " + display(close.server_bytes)],
          ["backend", close.backend],
        ]),
      ),
    );

    const clientPairs = [
      ["ip", client.ip],
      ["port", client.port],
    ];
    for (const [key, value] of Object.entries(client)) {
      if (key !== "ip" && key !== "port") clientPairs.push([key, value]);
    }
    body.append(section("Client", kvTable(clientPairs)));

    body.append(
      section(
        "TLS",
        kvTable([
          ["active", tls.active ? "yes" : "no"],
          ["handshake", tls.outcome],
          ["version", tls.version],
          ["cipher", tls.cipher],
          ["JA4", tls.ja4],
          ["JA3", tls.ja3],
          ["SNI", tls.sni],
          ["fallback SCSV", tls.fallback_scsv],
          ["client max version", tls.client_max_version],
        ]),
      ),
    );

    const auth = Array.isArray(s.auth) ? s.auth : [];
    const identity = section("Identity", kvTable([["user", s.user]]));
    if (auth.length) {
      const table = el(
        "table",
        { class: "grid" },
        el("tr", {}, el("th", {}, "time"), el("th", {}, "user"), el("th", {}, "mechanism"), el("th", {}, "outcome")),
      );
      for (const a of auth) {
        table.append(
          el(
            "tr",
            {},
            el("td", {}, when(a["@timestamp"])),
            el("td", { class: "user" }, display(a.user)),
            el("td", {}, display(a.mechanism)),
            el("td", {}, display(a.outcome)),
          ),
        );
      }
      identity.append(el("h4", {}, "login attempts"), table);
    } else {
      identity.append(el("p", { class: "empty" }, "no login attempts"));
    }
    body.append(identity);

    const verdicts = Array.isArray(s.verdicts) ? s.verdicts : [];
    const verdictSection = section("Verdicts");
    verdictSection.classList.add("wide");
    if (!verdicts.length) verdictSection.append(el("p", { class: "empty" }, "no verdicts"));
    for (const v of verdicts) {
      const title = v.rule_id ? v.rule_id + (v.rule_name ? " " + v.rule_name : "") : display(v.action);
      const meta = [
        "action " + display(v.verdict),
        v.severity ? "severity " + v.severity : null,
        v.phase ? "at " + v.phase : null,
        v.blocked ? "blocked" : "not blocked",
        when(v["@timestamp"]),
      ].filter(Boolean);
      const card = el(
        "div",
        { class: "verdict" + (v.blocked ? " blocked" : "") },
        el("h4", {}, el("span", { class: "rule-id" }, title)),
        el("p", { class: "meta" }, meta.join(" \u00b7 ")),
      );
      const evidence = v.evidence && typeof v.evidence === "object" ? Object.entries(v.evidence) : [];
      card.append(evidence.length ? kvTable(evidence) : el("p", { class: "empty" }, "no evidence recorded"));
      verdictSection.append(card);
    }
    body.append(verdictSection);

    const labels = Array.isArray(s.labels) ? s.labels : [];
    body.append(el("section", { class: "card", id: "d-labels" }, el("h3", {}, "Labels"), labelList(labels)));

    const lines = Array.isArray(s.transcript) ? s.transcript : [];
    const transcript = section("Transcript");
    transcript.classList.add("wide");
    if (lines.length) {
      const text = lines
        .map((l) => (l && l.dir === "c" ? "C: " : "S: ") + (l && l.line !== undefined ? String(l.line) : ""))
        .join("\n");
      transcript.append(el("pre", { class: "transcript" }, text));
      const events = Array.isArray(data.events) ? data.events : [];
      const left = events
        .filter((e) => e["event.action"] === "session.transcript")
        .reduce((n, e) => n + (Number(e["transcript.truncated"]) || 0), 0);
      if (left > 0) transcript.append(el("p", { class: "empty" }, left + " lines left out"));
    } else {
      transcript.append(el("p", { class: "empty" }, "no transcript"));
    }
    body.append(transcript);

    const events = Array.isArray(data.events) ? data.events : [];
    const table = el(
      "table",
      { class: "grid" },
      el("tr", {}, el("th", {}, "time"), el("th", {}, "kind"), el("th", {}, "action"), el("th", {}, "outcome")),
    );
    for (const e of events) {
      table.append(
        el(
          "tr",
          {},
          el("td", { class: "nowrap" }, when(e["@timestamp"])),
          el("td", {}, display(e["event.kind"])),
          el("td", { class: "mono" }, display(e["event.action"])),
          el("td", {}, display(e["event.outcome"])),
        ),
      );
    }
    const raw = el("pre", { class: "raw" }, JSON.stringify(events, null, 2));
    body.append(
      el(
        "details",
        { class: "card wide" },
        el("summary", {}, "All events (" + events.length + ")"),
        table,
        el("details", {}, el("summary", {}, "as JSON"), raw),
      ),
    );

    const ip = client.ip ? String(client.ip) : "";
    for (const span of document.querySelectorAll("#d-actions .ip")) span.textContent = ip;
    $("unban").hidden = $("allow").hidden = !ip;
    showAllowRemove();
    setStatus($("allow-state"), ip ? "Checking the allow list for " + ip + "\u2026" : "", "");
    $("d-actions").hidden = false;
  }

  async function showDetail(state) {
    show("detail-view");
    const id = state.session;
    current = null;
    $("d-id").textContent = id;
    $("d-body").replaceChildren();
    $("d-actions").hidden = true;
    setStatus($("action-status"), "", "");
    setStatus($("allow-state"), "", "");
    $("label-note").value = "";
    $("back").setAttribute("href", hashOf({ ...state, session: "" }));
    setStatus($("d-status"), "Loading\u2026", "");
    const r = await api("GET", "/api/sessions/" + encodeURIComponent(id));
    if (readHash().session !== id) return;
    if (!r.ok) {
      setStatus($("d-status"), "Cannot show this session (" + r.status + "): " + r.error, "error");
      return;
    }
    setStatus($("d-status"), "", "");
    current = r.data;
    renderSession(r.data);
    await checkAllowed();
  }

  // -- the actions -----------------------------------------------------------------------

  async function act(button, run) {
    const status = $("action-status");
    const buttons = document.querySelectorAll("#d-actions button");
    for (const b of buttons) b.disabled = true;
    setStatus(status, "Working\u2026", "");
    try {
      const [ok, text] = await run();
      setStatus(status, text, ok ? "ok" : "error");
    } catch (exc) {
      if (!(exc instanceof Unauthorized)) setStatus(status, "Failed: " + exc.message, "error");
    } finally {
      for (const b of buttons) b.disabled = false;
    }
  }

  function clientIp() {
    return current && current.summary && current.summary.client ? String(current.summary.client.ip || "") : "";
  }

  function unban() {
    const ip = clientIp();
    return act($("unban"), async () => {
      const r = await api("POST", "/api/unban", { ip });
      if (r.ok) return [true, "Unbanned " + ip + "."];
      return [false, "Unban failed (" + r.status + "): " + r.error];
    });
  }

  function allow() {
    const ip = clientIp();
    const sure = window.confirm(
      "Allow-list " + ip + "?\n\nIt is added to the trusted_networks list and the rules are " +
        "reloaded: sessions from this address are then trusted, without the rules that " +
        "would block them.",
    );
    if (!sure) {
      setStatus($("action-status"), "Allow-listing " + ip + " cancelled.", "");
      return undefined;
    }
    const id = current ? current.session_id : "";
    return act($("allow"), async () => {
      const r = await api("POST", "/api/allow", {
        kind: "ip",
        value: ip,
        comment: "review page, session " + id,
      });
      if (!r.ok) return [false, "Allow-listing failed (" + r.status + "): " + r.error];
      // added now or there already: the list says which entry, and whether Remove can take it out
      await checkAllowed();
      if (!r.data.added) return [true, String(r.data.message || "Already allow-listed.")];
      return [true, "Added " + r.data.value + " to " + r.data.list + " (" + r.data.file + "); the rules were reloaded."];
    });
  }

  // The exact allow-list entry of each client address, as GET /api/allow?ip= last
  // said ({value, list}): Remove is offered for it. Asked again whenever a session
  // opens and after every Allow-list and Remove, so it holds what the list file holds.
  const allowed = new Map();
  // the newest question asked: an older answer that comes late is not shown
  let allowAsked = 0;

  // "ENTRY (COMMENT)" for each entry that covers the address, as text
  function allowText(ip, data) {
    const entries = Array.isArray(data.entries) ? data.entries.filter((e) => e && typeof e === "object") : [];
    const lists = Array.isArray(data.lists) ? data.lists.map((l) => String(l && l.list)) : [];
    if (!entries.length) return ip + " is not on the allow list (" + (lists.join(", ") || "none") + ").";
    const by = entries.map(
      (e) =>
        String(e.entry) +
        (e.comment ? " (" + String(e.comment) + ")" : "") +
        (e.active === false ? " [in the file, not in force until the rules are reloaded]" : ""),
    );
    const where = [...new Set(entries.map((e) => String(e.list)))];
    return ip + " is allow-listed by " + by.join(" and by ") + " in " + where.join(", ") + ".";
  }

  // Ask the node which entries cover the session's client address: say so, and
  // offer Remove when one of them is exactly that address.
  async function checkAllowed() {
    const ip = clientIp();
    const state = $("allow-state");
    const mine = ++allowAsked;
    if (!ip) {
      setStatus(state, "", "");
      return;
    }
    const r = await api("GET", "/api/allow?" + new URLSearchParams({ ip }).toString());
    if (mine !== allowAsked || clientIp() !== ip) return;
    if (!r.ok || !r.data) {
      setStatus(state, "Cannot tell whether " + ip + " is allow-listed (" + r.status + "): " + r.error, "");
      return;
    }
    const entries = Array.isArray(r.data.entries) ? r.data.entries : [];
    const exact = entries.find((e) => e && e.exact === true);
    if (exact) allowed.set(ip, { value: String(exact.entry), list: String(exact.list || "") });
    else allowed.delete(ip);
    showAllowRemove();
    setStatus(state, allowText(ip, r.data), "");
  }

  function showAllowRemove() {
    const ip = clientIp();
    const entry = ip ? allowed.get(ip) : undefined;
    const button = $("allow-remove");
    button.hidden = !entry;
    button.querySelector(".entry").textContent = entry ? entry.value : "";
    button.querySelector(".list").textContent = entry ? entry.list : "";
  }

  async function allowRemove() {
    const ip = clientIp();
    const entry = allowed.get(ip);
    if (!entry) return;
    const button = $("allow-remove");
    const where = entry.list || "the allow list";
    await act(button, async () => {
      // an entry as written may be an address as a network (192.0.2.7/32): cidr takes both
      const body = { kind: entry.value.includes("/") ? "cidr" : "ip", value: entry.value };
      if (entry.list) body.list = entry.list;
      const r = await api("POST", "/api/allow/remove", body);
      let result;
      if (!r.ok) {
        result = [false, "Removing " + entry.value + " from " + where + " failed (" + r.status + "): " + r.error];
      } else if (!r.data.removed) {
        allowed.delete(ip);
        result = [false, "Nothing removed: " + String(r.data.message || "no such entry")];
      } else {
        allowed.delete(ip);
        let text = "Removed " + r.data.value + " from " + r.data.list + " (" + r.data.file + "); the rules were reloaded.";
        if (r.data.active) text += " " + r.data.value + " is still allowed: another entry of the list covers it.";
        result = [true, text];
      }
      showAllowRemove();
      // whatever happened, show what the list holds now
      await checkAllowed();
      return result;
    });
    // the button is gone: keyboard focus goes back to Allow-list, not to the top of the page
    if (button.hidden && (document.activeElement === button || document.activeElement === document.body)) {
      $("allow").focus();
    }
  }

  function label(value) {
    const note = $("label-note").value.trim();
    const id = current ? current.session_id : "";
    return act(value === "false_positive" ? $("label-fp") : $("label-confirmed"), async () => {
      const body = { label: value };
      if (note) body.note = note;
      const r = await api("POST", "/api/sessions/" + encodeURIComponent(id) + "/label", body);
      if (!r.ok) return [false, "Labelling failed (" + r.status + "): " + r.error];
      const event = r.data.event || {};
      if (current && current.session_id === id) {
        const labels = current.summary.labels || (current.summary.labels = []);
        labels.push({
          label: event["label.value"],
          note: event["label.note"],
          admin_client: event["admin.client"],
          "@timestamp": event["@timestamp"],
        });
        $("d-labels").replaceChildren(el("h3", {}, "Labels"), labelList(labels));
      }
      $("label-note").value = "";
      return [true, "Labelled " + value + (note ? " (note: " + note + ")" : "") + "."];
    });
  }

  // -- routing ---------------------------------------------------------------------------

  async function route() {
    if (!token()) {
      showLogin("");
      return;
    }
    const state = readHash();
    try {
      if (state.session) await showDetail(state);
      else await showList(state);
    } catch (exc) {
      if (!(exc instanceof Unauthorized)) throw exc;
    }
  }

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (!value) return;
      if (/[^\x21-\x7e]/.test(value)) {
        showLogin("That is not a token: it has spaces or characters outside printable ASCII.");
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      route();
    });
    $("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      go(filtersFromForm());
    });
    $("f-range").addEventListener("change", showCustom);
    $("reset").addEventListener("click", () => go({ range: DEFAULT_RANGE }));
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("");
    });
    $("unban").addEventListener("click", unban);
    $("allow").addEventListener("click", allow);
    $("allow-remove").addEventListener("click", allowRemove);
    $("load-older").addEventListener("click", loadOlder);
    $("label-fp").addEventListener("click", () => label("false_positive"));
    $("label-confirmed").addEventListener("click", () => label("confirmed"));
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
