// The dashboard's little JavaScript: re-fetch the server-rendered panels, draw the ingest
// chart, and the study browser over this archive's QIDO-RS and WADO-RS.
"use strict";
const ROOT = document.body.dataset.dicomweb;   // the DICOMweb base path, e.g. /dicom-web
const REFRESH_MS = 5000;

// A bearer token (archives with http_tokens): opened as /?access_token=..., the page keeps
// it for this tab, takes it out of the address bar, and sends it with each request.
const TOKEN = (() => {
  const url = new URL(window.location.href), given = url.searchParams.get("access_token");
  if (given) {
    sessionStorage.setItem("stowage.token", given);
    url.searchParams.delete("access_token");
    history.replaceState(null, "", url);
  }
  return sessionStorage.getItem("stowage.token");
})();
const authorized = (headers = {}) => (TOKEN ? { ...headers, Authorization: `Bearer ${TOKEN}` } : headers);

// --- live panels and the chart -------------------------------------------------------
function drawChart() {
  const canvas = document.getElementById("ingest-chart");
  if (!canvas) return;
  const data = JSON.parse(canvas.dataset.chart), now = Number(canvas.dataset.now);
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 28;
  const first = Math.floor(now / 60) * 60 - 59 * 60;
  const rate = new Array(60).fill(0), mbs = new Array(60).fill(0), ms = new Array(60).fill(null);
  for (const m of data.minutes) {
    const i = (m.minute - first) / 60;
    if (i >= 0 && i < 60) { rate[i] = m.instances / 60; mbs[i] = m.bytes / 60 / 1e6; }
  }
  for (const [minute, v] of Object.entries(data.per_instance_ms || {})) {
    const i = (Number(minute) - first) / 60;
    if (i >= 0 && i < 60) ms[i] = v;
  }
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui"; ctx.fillStyle = "#556";
  const top = (a) => Math.max(1e-9, ...a.filter((v) => v !== null));
  const maxRate = top(rate), maxMb = top(mbs), maxMs = top(ms);
  const x = (i) => pad + (i + 0.5) * (W - 2 * pad) / 60, y = (v, max) => H - pad - v / max * (H - 2 * pad);
  const bw = (W - 2 * pad) / 60 - 2;
  ctx.fillStyle = "#7fa7d6";
  rate.forEach((v, i) => { if (v) ctx.fillRect(x(i) - bw / 2, y(v, maxRate), bw, H - pad - y(v, maxRate)); });
  const line = (values, max, colour) => {
    ctx.strokeStyle = colour; ctx.lineWidth = 1.5; ctx.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      if (pen) ctx.lineTo(x(i), y(v, max)); else ctx.moveTo(x(i), y(v, max));
      pen = true;
    });
    ctx.stroke();
  };
  line(mbs, maxMb, "#2a7d3f");
  line(ms, maxMs, "#c26a00");
  ctx.fillStyle = "#c26a00";  // a dot per minute too: a lone minute draws no line
  ms.forEach((v, i) => { if (v !== null) { ctx.beginPath(); ctx.arc(x(i), y(v, maxMs), 2.5, 0, 7); ctx.fill(); } });
  ctx.fillStyle = "#556";
  const fmt = (v) => (v > 1e-6 ? Number(v.toPrecision(2)) : 0).toString();
  ctx.fillText(`${fmt(maxRate)} inst/s`, 2, pad - 8);
  ctx.fillText(`${fmt(maxMb)} MB/s`, W / 2 - 30, pad - 8);
  if (maxMs > 1e-6) ctx.fillText(`${fmt(maxMs)} ms`, W - 70, pad - 8);
  ctx.fillText("−60 min", pad, H - 8); ctx.fillText("now", W - pad - 20, H - 8);
  ctx.strokeStyle = "#ccd"; ctx.beginPath(); ctx.moveTo(pad, H - pad); ctx.lineTo(W - pad, H - pad); ctx.stroke();
}

async function refreshPanels() {
  if (document.hidden) return;  // a tab in the background costs the archive nothing
  try {
    const r = await fetch("/dashboard/panels", { cache: "no-store", headers: authorized() });
    if (r.ok) { document.getElementById("panels").innerHTML = await r.text(); drawChart(); }
  } catch (e) { /* the server restarting: try again next time */ }
}

// --- the study browser ---------------------------------------------------------------
const value = (ds, tag) => {
  const v = ds[tag] && ds[tag].Value && ds[tag].Value[0];
  return v && typeof v === "object" ? (v.Alphabetic || "") : (v === undefined ? "" : String(v));
};
const values = (ds, tag) => (ds[tag] && ds[tag].Value || []).join(", ");
const cell = (text) => { const td = document.createElement("td"); td.textContent = text; return td; };
const prettyDate = (d) => d.length === 8 ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : d;

async function qido(path, params) {
  const r = await fetch(`${ROOT}${path}?${params}`, { headers: authorized({ Accept: "application/dicom+json" }) });
  if (r.status === 204) return [];
  if (!r.ok) throw new Error(`${r.status} ${r.statusText}: ${await r.text()}`);
  return r.json();
}

let searches = 0;  // only the latest search may fill the table

async function searchStudies(event) {
  if (event) event.preventDefault();
  const mine = ++searches;
  const form = document.getElementById("study-search"), state = document.getElementById("search-state");
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) {
    const text = v.trim();
    if (text) params.append(k, k === "PatientName" && !/[*?]/.test(text) ? `${text}*` : text);
  }
  params.append("limit", "50");
  params.append("fuzzymatching", "true");  // names match ignoring case and accents
  for (const tag of ["00081030", "00080061", "00201206", "00201208"]) params.append("includefield", tag);
  state.textContent = "searching…";
  const body = document.querySelector("#study-results tbody");
  try {
    const studies = await qido("/studies", params);
    if (mine !== searches) return;
    body.replaceChildren();
    for (const ds of studies) body.append(...studyRows(ds));
    state.textContent = `${studies.length} stud${studies.length === 1 ? "y" : "ies"}`;
  } catch (e) {
    if (mine === searches) state.textContent = `search failed: ${e.message}`;
  }
}

function studyRows(ds) {
  const uid = value(ds, "0020000D");
  const tr = document.createElement("tr");
  tr.className = "study"; tr.dataset.uid = uid;
  tr.append(cell(value(ds, "00100010")), cell(value(ds, "00100020")), cell(prettyDate(value(ds, "00080020"))),
            cell(value(ds, "00081030")), cell(values(ds, "00080061")), cell(value(ds, "00201206")),
            cell(value(ds, "00201208")));
  const open = document.createElement("td"), a = document.createElement("a");
  // OHIF takes the token as ?token= and sends it as a bearer token with its own requests
  a.href = `/viewer?StudyInstanceUIDs=${encodeURIComponent(uid)}` + (TOKEN ? `&token=${encodeURIComponent(TOKEN)}` : ""); a.className = "open"; a.textContent = "Open in viewer";
  a.addEventListener("click", (e) => e.stopPropagation());
  open.append(a); tr.append(open);
  const detail = document.createElement("tr"), td = document.createElement("td");
  detail.hidden = true; detail.className = "series-row"; td.colSpan = 8; detail.append(td);
  tr.addEventListener("click", () => toggleSeries(uid, detail, td));
  return [tr, detail];
}

// Modalities whose series hold no image: no thumbnail is asked for (the answer is a 404).
const NO_IMAGE = new Set(["SR", "KO", "PR", "DOC", "REG", "FID", "RWV", "AU", "ECG", "HD", "RTSTRUCT", "RTPLAN",
                          "RTRECORD", "PLAN"]);

async function toggleSeries(study, row, td) {
  row.hidden = !row.hidden;
  if (row.hidden || td.dataset.loaded) return;
  td.dataset.loaded = "1"; td.textContent = "loading series…";
  const params = new URLSearchParams();
  for (const tag of ["0008103E", "00201209"]) params.append("includefield", tag);
  try {
    const series = await qido(`/studies/${encodeURIComponent(study)}/series`, params);
    const box = document.createElement("div"); box.className = "series";
    for (const ds of series) {
      const uid = value(ds, "0020000E"), fig = document.createElement("figure"), img = document.createElement("img");
      img.alt = `series ${value(ds, "00200011")}`; img.loading = "lazy";
      if (NO_IMAGE.has(value(ds, "00080060"))) img.alt += " (no image)";
      else showThumbnail(img, `${ROOT}/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(uid)}/thumbnail?viewport=128,128`);
      const cap = document.createElement("figcaption");
      cap.textContent = `${value(ds, "00080060")} #${value(ds, "00200011")} ${value(ds, "0008103E")} (${value(ds, "00201209")})`;
      fig.dataset.uid = uid; fig.append(img, cap); box.append(fig);
    }
    td.replaceChildren(box);
  } catch (e) {
    td.textContent = `series failed: ${e.message}`;
  }
}

function showThumbnail(img, url) {
  if (!TOKEN) { img.src = url; return; }
  // An <img> cannot send a header: fetch it with the token, show what came back.
  fetch(url, { headers: authorized({ Accept: "image/jpeg" }) })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`${r.status}`))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch((e) => { img.alt = `thumbnail failed: ${e.message}`; });
}

document.getElementById("study-search").addEventListener("submit", searchStudies);
drawChart();
setInterval(refreshPanels, REFRESH_MS);
searchStudies();
