// The simsteer playground: plain JavaScript, no dependencies, no build step.
// It talks only to the server that served it: GET /v1/models for the steerings, and one
// streaming POST /v1/chat/completions per column (all columns at once; the server batches them).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "simsteer-playground-key"; // sessionStorage: gone when the tab closes
  const RERUN_DELAY_MS = 150; // a slider dragged by the keyboard fires one change per step

  const state = {
    apiKey: "",
    model: "",
    steerings: [],
    columns: new Map(), // key -> {element, controller}
    ran: false,
    rerunTimer: null,
  };

  // -- talking to the server ---------------------------------------------------------------

  function headers(json) {
    const out = {};
    if (json) out["Content-Type"] = "application/json";
    if (state.apiKey) out.Authorization = `Bearer ${state.apiKey}`;
    return out;
  }

  /** "STATUS message" from an error response: the server's own message, as it sent it. */
  async function errorText(response) {
    let message = "";
    try {
      const text = await response.text();
      try {
        const body = JSON.parse(text);
        message = (body && body.error && body.error.message) || (body && body.detail) || text;
      } catch {
        message = text;
      }
    } catch {
      message = "";
    }
    return `${response.status} ${message || response.statusText}`.trim();
  }

  function setStatus(text, bad = false) {
    const el = $("server-status");
    el.textContent = text;
    el.classList.toggle("bad", bad);
  }

  async function connect() {
    setStatus("connecting\u2026");
    $("run").disabled = true;
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers(false) });
    } catch (err) {
      setStatus(`cannot reach the server: ${err.message}`, true);
      return;
    }
    const keyError = $("key-error");
    if (response.status === 401) {
      const text = await errorText(response);
      $("key-panel").hidden = false;
      $("key-panel").classList.remove("ok");
      keyError.hidden = !state.apiKey; // no key typed yet: only ask for one
      keyError.textContent = text;
      setStatus("this server needs an API key", true);
      $("api-key").focus();
      return;
    }
    if (!response.ok) {
      setStatus(await errorText(response), true);
      return;
    }
    keyError.hidden = true;
    if (state.apiKey) $("key-panel").classList.add("ok");
    const ids = ((await response.json()).data || []).map((m) => m.id);
    state.model = ids.find((id) => !id.includes(":")) || (ids[0] || "").split(":")[0];
    const prefix = `${state.model}:`;
    state.steerings = ids.filter((id) => id.startsWith(prefix)).map((id) => id.slice(prefix.length));
    fillPicker();
    let engine = "";
    try {
      const health = await fetch("/health", { headers: headers(false) });
      if (health.ok) engine = (await health.json()).engine || "";
    } catch {
      engine = "";
    }
    const count = state.steerings.length;
    const parts = [state.model, `${count} steering${count === 1 ? "" : "s"}`];
    if (engine) parts.push(`engine ${engine}`);
    setStatus(parts.join(" \u00b7 "));
    $("run").disabled = false;
  }

  function fillPicker() {
    const picker = $("steering");
    picker.replaceChildren();
    for (const name of state.steerings) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      picker.append(option);
    }
    if (!state.steerings.length) {
      const option = document.createElement("option");
      option.value = "";
      option.textContent = "(no steerings: serve with --steering NAME=PATH)";
      picker.append(option);
    }
    picker.disabled = !state.steerings.length;
  }

  // -- the form ----------------------------------------------------------------------------

  /** A number field's value, or undefined when it is empty (the server's default then). */
  function numberField(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  }

  /** The request body every column shares: prompt and sampling settings. */
  function sharedBody() {
    const body = { messages: [{ role: "user", content: $("prompt").value }], stream: true };
    const fields = { temperature: "temperature", max_tokens: "max-tokens", seed: "seed" };
    for (const [name, id] of Object.entries(fields)) {
      const value = numberField(id);
      if (value !== undefined) body[name] = value;
    }
    return body;
  }

  function strengthLabel(value) {
    return `\u00d7 ${Number(value)}`;
  }

  function steeredSpec(strength) {
    const steering = $("steering").value;
    return {
      key: `strength-${strength}`,
      title: steering,
      tag: strengthLabel(strength),
      body: { model: `${state.model}:${steering}`, strength: Number(strength) },
    };
  }

  /** The columns of the chosen view, or an error message. */
  function columnSpecs() {
    if (!state.steerings.length) return "this server has no steerings to compare";
    if (mode() === "compare") {
      const unsteered = { key: "unsteered", title: "unsteered", tag: "", body: { model: state.model, steering: "none" } };
      return [unsteered, { ...steeredSpec($("strength").value), key: "steered" }];
    }
    const strengths = $("sweep").value.split(/[\s,;]+/).filter(Boolean);
    if (strengths.length < 3 || strengths.length > 5 || strengths.some((s) => !Number.isFinite(Number(s)))) {
      return "a sweep takes 3 to 5 strengths, e.g. 0, 0.5, 1, 1.5, 2";
    }
    return strengths.map((s, i) => ({ ...steeredSpec(s), key: `sweep-${i}` }));
  }

  function mode() {
    return document.querySelector('input[name="mode"]:checked').value;
  }

  function showFormError(text) {
    const el = $("form-error");
    el.textContent = text || "";
    el.hidden = !text;
  }

  // -- columns -----------------------------------------------------------------------------

  function makeColumn(spec) {
    const element = document.createElement("article");
    element.className = "column";
    element.id = `col-${spec.key}`;
    const header = document.createElement("header");
    const title = document.createElement("h2");
    const tag = document.createElement("span");
    tag.className = "tag";
    header.append(title, tag);
    const text = document.createElement("div");
    text.className = "text";
    const footer = document.createElement("footer");
    footer.className = "state";
    element.append(header, text, footer);
    const column = { element, controller: null };
    state.columns.set(spec.key, column);
    return column;
  }

  function label(column, spec) {
    column.element.querySelector("h2").textContent = spec.title;
    column.element.querySelector(".tag").textContent = spec.tag;
    column.element.classList.toggle("steered", spec.key !== "unsteered");
  }

  function updateButtons() {
    const busy = [...state.columns.values()].some((c) => c.controller);
    $("stop").disabled = !busy;
  }

  function finishColumn(column, text, kind) {
    column.controller = null;
    column.element.classList.remove("streaming");
    column.element.classList.toggle("failed", kind === "error");
    column.element.dataset.state = kind;
    column.element.querySelector(".state").textContent = text;
    updateButtons();
  }

  /** Stream one completion into ``column`` (aborting what it was streaming before). */
  async function stream(column, spec) {
    if (column.controller) column.controller.abort();
    const controller = new AbortController();
    column.controller = controller;
    label(column, spec);
    const el = column.element;
    const textEl = el.querySelector(".text");
    textEl.textContent = "";
    delete el.dataset.steering;
    delete el.dataset.strength;
    el.dataset.state = "waiting";
    el.classList.remove("failed");
    el.classList.add("streaming");
    el.querySelector(".state").textContent = "waiting\u2026";
    updateButtons();
    const started = performance.now();
    let pieces = 0;
    let finish = "";
    let failure = "";
    const body = { ...sharedBody(), ...spec.body };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        const text = await errorText(response);
        if (column.controller === controller) finishColumn(column, text, "error");
        return;
      }
      el.dataset.state = "streaming";
      el.querySelector(".state").textContent = "streaming\u2026";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (column.controller !== controller) return; // a newer request owns the column now
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (!data || data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) {
              failure = `server error: ${chunk.error.message}`;
              continue;
            }
            if (chunk.steering !== undefined) {
              // What the server says it used (the reply names the steering and strength).
              el.dataset.steering = chunk.steering;
              el.dataset.strength = String(chunk.strength);
            }
            const choice = (chunk.choices || [])[0];
            if (!choice) continue;
            const delta = choice.delta && choice.delta.content;
            if (delta) {
              pieces += 1;
              textEl.textContent += delta;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      if (column.controller !== controller) return;
      if (failure) {
        finishColumn(column, failure, "error");
        return;
      }
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const used = el.dataset.steering === "none" ? "unsteered" : `${el.dataset.steering} \u00d7 ${el.dataset.strength}`;
      const parts = [finish || "done", `${pieces} piece${pieces === 1 ? "" : "s"}`, `${seconds} s`, `server: ${used}`];
      finishColumn(column, parts.join(" \u00b7 "), "done");
    } catch (err) {
      if (column.controller !== controller) return; // replaced by a newer request
      if (err.name === "AbortError") finishColumn(column, "stopped", "stopped");
      else finishColumn(column, `network error: ${err.message}`, "error");
    }
  }

  /** The request of ``spec`` as a curl command (not streamed; the key as a variable). */
  function curlCommand(spec) {
    const body = { ...sharedBody(), ...spec.body };
    delete body.stream;
    const json = JSON.stringify(body).replaceAll("'", "'\\''");
    const lines = [`curl ${location.origin}/v1/chat/completions`, '-H "Content-Type: application/json"'];
    if (state.apiKey) lines.push('-H "Authorization: Bearer $SIMS_API_KEY"');
    lines.push(`-d '${json}'`);
    return lines.join(" \\\n  ");
  }

  function showCurl(spec) {
    $("curl").textContent = curlCommand(spec);
    $("api").hidden = false;
  }

  function run() {
    showFormError("");
    const specs = columnSpecs();
    if (typeof specs === "string") {
      showFormError(specs);
      return;
    }
    stopAll();
    const holder = $("columns");
    holder.replaceChildren();
    state.columns.clear();
    holder.dataset.mode = mode();
    for (const spec of specs) {
      const column = makeColumn(spec);
      holder.append(column.element);
      stream(column, spec);
    }
    showCurl(mode() === "compare" ? specs[1] : specs[0]); // the steered column, or the sweep's first
    state.ran = true;
  }

  function stopAll() {
    for (const column of state.columns.values()) {
      if (column.controller) column.controller.abort();
    }
  }

  /** After a compare run, a new strength regenerates only the steered column. */
  function rerunSteered() {
    const column = state.columns.get("steered");
    if (!state.ran || !column || mode() !== "compare" || !state.steerings.length) return;
    const spec = { ...steeredSpec($("strength").value), key: "steered" };
    stream(column, spec);
    showCurl(spec);
  }

  // -- wiring ------------------------------------------------------------------------------

  function showStrength() {
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
  }

  function init() {
    try {
      state.apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      state.apiKey = "";
    }
    $("api-key").value = state.apiKey;
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.apiKey = $("api-key").value.trim();
      try {
        sessionStorage.setItem(KEY_STORAGE, state.apiKey);
      } catch {
        // storage refused (private mode): the key lives in this page only
      }
      connect();
    });
    $("run-form").addEventListener("submit", (event) => {
      event.preventDefault();
      run();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        if (!$("run").disabled) run();
      }
    });
    $("stop").addEventListener("click", stopAll);
    $("copy-curl").addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText($("curl").textContent);
        $("copy-curl").textContent = "Copied";
      } catch {
        getSelection().selectAllChildren($("curl")); // no clipboard here: select it to copy by hand
      }
    });
    $("strength").addEventListener("input", showStrength);
    $("strength").addEventListener("change", () => {
      clearTimeout(state.rerunTimer);
      state.rerunTimer = setTimeout(rerunSteered, RERUN_DELAY_MS);
    });
    $("steering").addEventListener("change", rerunSteered);
    $("new-seed").addEventListener("click", () => {
      $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => {
        const sweep = mode() === "sweep";
        $("sweep-field").hidden = !sweep;
        $("strength").disabled = sweep;
      });
    }
    showStrength();
    connect();
  }

  init();
})();
