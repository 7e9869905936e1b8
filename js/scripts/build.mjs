// Builds src/ into ../aiaas_lab/static/. The built files are committed, so `pip install -e .`
// needs no node; `--check` (run by `npm test`, hence `make test`) fails when they are stale.
import { build } from "esbuild";
import { readFile, writeFile, mkdir } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const src = path.join(here, "..", "src");
const out = path.join(here, "..", "..", "aiaas_lab", "static");
const targets = [
  { entry: "widget.js", options: { format: "esm", target: "es2020" } },
  { entry: "widget.css", options: {} },
];

const check = process.argv.includes("--check");
let stale = [];
for (const { entry, options } of targets) {
  const result = await build({
    entryPoints: [path.join(src, entry)],
    bundle: true,
    minify: true,
    write: false,
    legalComments: "none",
    logLevel: "error",
    ...options,
  });
  const text = result.outputFiles[0].text;
  const file = path.join(out, entry);
  if (check) {
    const current = await readFile(file, "utf8").catch(() => "");
    if (current !== text) stale.push(file);
  } else {
    await mkdir(out, { recursive: true });
    await writeFile(file, text);
    console.log(`built ${path.relative(process.cwd(), file)} (${text.length} bytes)`);
  }
}
if (stale.length) {
  console.error(`stale build: ${stale.join(", ")} differ from js/src; run \`npm run build\` in js/ and commit.`);
  process.exit(1);
}
