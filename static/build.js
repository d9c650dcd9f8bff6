// The "start a graph build" form: create a project (JSON text or multipart files), then start the build.
import { $, setText } from "./dom.js";
import { api, ApiError } from "./api.js";

function readInt(id) {
  const raw = $(id).value.trim();
  return /^\d+$/.test(raw) ? Number(raw) : NaN;
}

function invalid(field, message) {
  const input = $(field);
  input.setAttribute("aria-invalid", "true");
  setText($("build-error"), message);
  input.focus();
  return null;
}

function readForm() {
  for (const id of ["build-name", "build-text", "build-files", "build-chunk-size", "build-chunk-overlap"]) {
    $(id).removeAttribute("aria-invalid");
  }
  const name = $("build-name").value.trim();
  const text = $("build-text").value;
  const files = [...$("build-files").files];
  const chunkSize = readInt("build-chunk-size");
  const chunkOverlap = readInt("build-chunk-overlap");
  if (!name) return invalid("build-name", "Give the project a name.");
  if (!files.length && !text.trim()) return invalid("build-text", "Paste some text or choose at least one file.");
  if (!(chunkSize >= 1)) return invalid("build-chunk-size", "Chunk size must be a whole number of at least 1.");
  if (!(chunkOverlap >= 0)) return invalid("build-chunk-overlap", "Chunk overlap must be a whole number (0 or more).");
  if (chunkOverlap >= chunkSize) return invalid("build-chunk-overlap", "Chunk overlap must be smaller than the chunk size.");
  return { name, text, files, chunkSize, chunkOverlap };
}

async function createProject({ name, text, files }) {
  if (files.length) {
    const form = new FormData();
    form.append("name", name);
    for (const file of files) form.append("files", file, file.name);
    return api("api/graph/project", { method: "POST", body: form });
  }
  return api("api/graph/project", { method: "POST", json: { name, text } });
}

/** Wire the form; `openTask(id)` shows the new task. */
export function setupBuildForm(openTask) {
  const form = $("build-form");
  const submit = $("build-submit");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setText($("build-error"), "");
    const values = readForm();
    if (!values) return;
    submit.disabled = true;
    try {
      setText($("build-status"), values.files.length ? "Uploading files…" : "Creating the project…");
      const project = (await createProject(values)).data;
      const projectId = project.project_id ?? project.id;
      setText($("build-status"), "Starting the build…");
      let taskId;
      try {
        const started = await api("api/graph/build", {
          method: "POST",
          json: { project_id: projectId, chunk_size: values.chunkSize, chunk_overlap: values.chunkOverlap },
        });
        taskId = started.data.task_id;
      } catch (err) {
        // A build already running for this project: follow that one.
        if (err instanceof ApiError && err.status === 409 && err.body?.task_id) taskId = err.body.task_id;
        else throw err;
      }
      setText($("build-status"), "");
      form.reset();
      openTask(taskId);
    } catch (err) {
      setText($("build-status"), "");
      const why = err instanceof ApiError ? err.message : "the server could not be reached";
      setText($("build-error"), `Could not start the build: ${why}.`);
    } finally {
      submit.disabled = false;
    }
  });
}
