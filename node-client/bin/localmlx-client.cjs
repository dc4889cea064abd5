#!/usr/bin/env node
// `npx @localmlx/client setup`: creates a private virtualenv and pip-installs the localmlx sidecar
// into it, where the client finds it (see findSidecar in src/process.ts).
// `npx @localmlx/client wooster-install <wooster-dir>`: puts the localMLX plugin into a Wooster
// checkout (src/plugins/localMLX/) and adds @localmlx/client to its package.json, then installs.
// Safe to run again: it only writes what differs. It refuses a directory that is not Wooster.
"use strict";
const { spawnSync } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const packageRoot = path.resolve(__dirname, "..");
const pluginSource = path.join(packageRoot, "wooster");
const PLUGIN_DIR = path.join("src", "plugins", "localMLX");
const DEPENDENCY = "@localmlx/client";

const SETUP_USAGE = `Usage: localmlx-client setup [options] [-- <pip install options>]

Creates a private virtualenv for the localmlx sidecar and pip-installs it there. The client then
finds it with no LOCALMLX_PYTHON. Run it again to reinstall or upgrade.

Options:
  --from <spec>            what to pip-install: a localmlx checkout's path, a git URL
                           (git+https://…/localmlx.git), a wheel or an sdist (default: the
                           checkout this package lives in, if it lives in one)
  --venv <dir>             where (default: $LOCALMLX_VENV, else $XDG_DATA_HOME/localmlx/venv,
                           i.e. ~/.local/share/localmlx/venv)
  --python <python>        the Python (3.11 or newer) to create it with (default: the first of
                           python3.13, python3.12, python3.11, python3 that is new enough)
  --system-site-packages   let the virtualenv see that Python's own packages
  -- <options>             passed on to pip install (--no-deps, --index-url …)
  -h, --help               this text`;

const USAGE = `Usage: localmlx-client setup [options]                   (see setup --help)
       localmlx-client serve [--config <file>]                 (see serve --help)
       localmlx-client install-service | uninstall-service     (see install-service --help)
       localmlx-client wooster-install <wooster-dir> [options]

Copies the localMLX plugin into <wooster-dir>/${PLUGIN_DIR}/, adds ${DEPENDENCY} to
Wooster's package.json, and installs it. Run it again to update; it changes only what differs.

Options:
  --spec <spec>    the dependency as package.json should name it (default: this package's
                   folder when it lives in a localmlx checkout, "link:" for pnpm or "file:"
                   for npm; else "^<version>")
  --no-install     edit package.json only; run your package manager yourself
  --dry-run        say what would change, change nothing
  -h, --help       this text`;

class UsageError extends Error {}

function parseArgs(argv) {
  const options = { install: true, dryRun: false, spec: undefined, dir: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--no-install") options.install = false;
    else if (arg === "--dry-run") options.dryRun = true;
    else if (arg === "--spec") {
      options.spec = argv[++i];
      if (!options.spec) throw new UsageError("--spec needs a value");
    } else if (arg.startsWith("--spec=")) options.spec = arg.slice("--spec=".length);
    else if (arg.startsWith("-")) throw new UsageError(`unknown option ${arg}`);
    else if (options.dir === undefined) options.dir = arg;
    else throw new UsageError(`unexpected argument ${arg}`);
  }
  if (!options.dir) throw new UsageError("which Wooster checkout? give its directory");
  return options;
}

/** Why `dir` is not a Wooster checkout, or undefined when it is one. */
function notWooster(dir) {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) return `${dir} is not a directory`;
  const pkgFile = path.join(dir, "package.json");
  if (!fs.existsSync(pkgFile)) return `${dir} has no package.json`;
  try {
    JSON.parse(fs.readFileSync(pkgFile, "utf8"));
  } catch (error) {
    return `${pkgFile} is not valid JSON (${error.message})`;
  }
  const manager = path.join(dir, "src", "pluginManager.ts");
  const types = path.join(dir, "src", "types", "plugin.ts");
  if (!fs.existsSync(manager) || !/loadPlugins/.test(fs.readFileSync(manager, "utf8"))) {
    return `${dir} has no src/pluginManager.ts with loadPlugins (Wooster's plugin loader)`;
  }
  if (!fs.existsSync(types) || !/WoosterPlugin/.test(fs.readFileSync(types, "utf8"))) {
    return `${dir} has no src/types/plugin.ts declaring WoosterPlugin`;
  }
  return undefined;
}

function packageManager(dir) {
  if (fs.existsSync(path.join(dir, "pnpm-lock.yaml"))) return "pnpm";
  if (fs.existsSync(path.join(dir, "yarn.lock"))) return "yarn";
  return "npm";
}

function defaultSpec(dir, manager) {
  const inCheckout = fs.existsSync(path.join(packageRoot, "..", "sidecar", "__main__.py"));
  if (inCheckout) {
    let relative = path.relative(dir, packageRoot).split(path.sep).join("/");
    if (!relative.startsWith(".")) relative = `./${relative}`;
    return `${manager === "pnpm" ? "link" : "file"}:${relative}`;
  }
  const version = JSON.parse(fs.readFileSync(path.join(packageRoot, "package.json"), "utf8")).version;
  return `^${version}`;
}

/** The plugin's files: every .ts in wooster/ (its tsconfig.json is for checking it here only). */
function pluginFiles() {
  return fs
    .readdirSync(pluginSource)
    .filter((name) => name.endsWith(".ts") && !name.endsWith(".test.ts"))
    .sort();
}

function install(argv, out = console.log) {
  const options = parseArgs(argv);
  const dir = path.resolve(options.dir);
  const why = notWooster(dir);
  if (why) throw new UsageError(`not a Wooster checkout: ${why}. Nothing was changed.`);

  const changes = [];
  const target = path.join(dir, PLUGIN_DIR);
  const files = pluginFiles();
  for (const name of files) {
    const from = path.join(pluginSource, name);
    const to = path.join(target, name);
    const content = fs.readFileSync(from);
    if (fs.existsSync(to) && fs.readFileSync(to).equals(content)) continue;
    changes.push(`${fs.existsSync(to) ? "update" : "add"} ${path.join(PLUGIN_DIR, name)}`);
    if (!options.dryRun) {
      fs.mkdirSync(target, { recursive: true });
      fs.writeFileSync(to, content);
    }
  }

  const manager = packageManager(dir);
  const spec = options.spec ?? defaultSpec(dir, manager);
  const pkgFile = path.join(dir, "package.json");
  const text = fs.readFileSync(pkgFile, "utf8");
  const pkg = JSON.parse(text);
  if (!(pkg.dependencies && pkg.dependencies["@langchain/core"])) {
    out(`warning: ${pkgFile} does not list @langchain/core; the plugin's tools need it (Wooster has it).`);
  }
  if (!pkg.dependencies || pkg.dependencies[DEPENDENCY] !== spec) {
    const was = pkg.dependencies && pkg.dependencies[DEPENDENCY];
    pkg.dependencies = { ...(pkg.dependencies || {}), [DEPENDENCY]: spec };
    pkg.dependencies = Object.fromEntries(Object.entries(pkg.dependencies).sort(([a], [b]) => a.localeCompare(b)));
    changes.push(`${was ? `change ${DEPENDENCY} from ${was} to` : `add dependency ${DEPENDENCY}@`}${spec} in package.json`);
    if (!options.dryRun) {
      const indent = (/^\{\r?\n([ \t]+)"/.exec(text) || [])[1] || "  ";
      fs.writeFileSync(pkgFile, JSON.stringify(pkg, null, indent) + (text.endsWith("\n") ? "\n" : ""));
    }
  }

  if (changes.length === 0) out(`localMLX plugin already installed and up to date in ${dir}.`);
  else for (const change of changes) out(`${options.dryRun ? "would " : ""}${change}`);

  const installed = fs.existsSync(path.join(dir, "node_modules", DEPENDENCY, "package.json"));
  if (options.install && !options.dryRun && (changes.length > 0 || !installed)) {
    out(`running ${manager} install in ${dir} …`);
    const run = spawnSync(manager, ["install"], { cwd: dir, stdio: "inherit", shell: process.platform === "win32" });
    if (run.error || run.status !== 0) {
      out(`${manager} install did not finish (${run.error ? run.error.message : `exit ${run.status}`}); run it yourself in ${dir}.`);
      process.exitCode = 1;
    }
  } else if (!options.install && (changes.length > 0 || !installed)) {
    out(`next: run \`${manager} install\` in ${dir}.`);
  }
  if (changes.length > 0 && !options.dryRun) {
    out(
      [
        "",
        "Enable it in Wooster's .env:",
        "  PLUGIN_LOCALMLX_ENABLED=true",
        "  LOCALMLX_PYTHON=/path/to/localmlx/.venv/bin/python   # the Python with localmlx and MLX",
        "  LOCALMLX_DEFAULT_MODEL=mlx-community/Qwen2.5-3B-Instruct-4bit",
        "See the \"Use it from Wooster\" section of @localmlx/client's README for the other settings.",
      ].join("\n"),
    );
  }
  return changes;
}

// ---- setup: a private virtualenv with the sidecar -------------------------------------------

function parseSetupArgs(argv) {
  const options = { from: undefined, venv: undefined, python: undefined, systemSitePackages: false, pipArgs: [] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = (name) => {
      const next = argv[++i];
      if (next === undefined) throw new UsageError(`${name} needs a value`);
      return next;
    };
    if (arg === "--") {
      options.pipArgs = argv.slice(i + 1);
      break;
    } else if (arg === "--from") options.from = value(arg);
    else if (arg === "--venv") options.venv = value(arg);
    else if (arg === "--python") options.python = value(arg);
    else if (arg === "--system-site-packages") options.systemSitePackages = true;
    else if (/^--(from|venv|python)=/.test(arg)) options[arg.slice(2, arg.indexOf("="))] = arg.slice(arg.indexOf("=") + 1);
    else throw new UsageError(`unknown option ${arg}`);
  }
  return options;
}

/** True when `python` runs and is 3.11 or newer. */
function isRecentPython(python) {
  const run = spawnSync(python, ["-c", "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)"], { stdio: "ignore" });
  return !run.error && run.status === 0;
}

function venvPython(venv) {
  return process.platform === "win32" ? path.join(venv, "Scripts", "python.exe") : path.join(venv, "bin", "python");
}

function privateVenvDir() {
  try {
    return require(path.join(packageRoot, "dist", "index.js")).privateVenvDir();
  } catch {
    throw new UsageError("this package is not built (no dist/): run `npm run build` in it first");
  }
}

function run(command, args, out) {
  out(`$ ${[command, ...args].join(" ")}`);
  const result = spawnSync(command, args, { stdio: ["ignore", "inherit", "inherit"] });
  if (result.error) throw new UsageError(`could not run ${command}: ${result.error.message}`);
  if (result.status !== 0) throw new UsageError(`${path.basename(command)} ${args[0] === "-m" ? args[1] : args[0]} failed (exit ${result.status})`);
}

function setup(argv, out = console.log) {
  const options = parseSetupArgs(argv);
  const checkout = path.resolve(packageRoot, "..");
  const inCheckout = fs.existsSync(path.join(checkout, "sidecar", "__main__.py")) && fs.existsSync(path.join(checkout, "pyproject.toml"));
  let spec = options.from;
  if (spec === undefined) {
    if (!inCheckout) {
      throw new UsageError(
        "say what to install with --from: a localmlx checkout's path, or its git URL (--from git+https://…/localmlx.git)",
      );
    }
    spec = checkout;
  } else if (/^[.~]|[\\/]/.test(spec) && !/^[a-z+]+:\/\//i.test(spec) && fs.existsSync(path.resolve(spec))) {
    spec = path.resolve(spec); // a path relative to where setup runs
  }
  const venv = path.resolve(options.venv ?? privateVenvDir());
  const python = venvPython(venv);
  if (!fs.existsSync(python)) {
    const base = options.python ?? ["python3.13", "python3.12", "python3.11", "python3"].find(isRecentPython);
    if (!base) throw new UsageError("no Python 3.11 or newer found on PATH; name one with --python");
    if (!isRecentPython(base)) throw new UsageError(`${base} is not a Python 3.11 or newer`);
    run(base, ["-m", "venv", ...(options.systemSitePackages ? ["--system-site-packages"] : []), venv], out);
  }
  run(python, ["-m", "pip", "install", "--disable-pip-version-check", "--upgrade", spec, ...options.pipArgs], out);
  // The way the client runs it: -P keeps the cwd off sys.path.
  run(python, ["-P", "-c", "import sidecar.cli"], out);
  const defaultVenv = (() => {
    try {
      return path.resolve(privateVenvDir());
    } catch {
      return undefined;
    }
  })();
  out(`\nThe localmlx sidecar is installed in ${venv}.`);
  if (venv === defaultVenv) {
    out("The client finds it there (unless LOCALMLX_PYTHON, the `python` option or a `localmlx` on PATH comes first).");
  } else {
    out(`The client looks there when LOCALMLX_VENV=${venv} is set; or pass python: "${python}".`);
  }
  return { venv, python, spec };
}

// `serve`, `install-service`, `uninstall-service`: the endpoint as a service (src/service/, built into dist/).
const SERVICE_COMMANDS = new Set(["serve", "install-service", "uninstall-service"]);

function runService(command, rest) {
  let dist;
  try {
    dist = require(path.join(packageRoot, "dist", "index.js"));
  } catch {
    console.error("localmlx-client: this package is not built (no dist/): run `npm run build` in it first");
    process.exitCode = 2;
    return;
  }
  dist.runServiceCommand(command, rest, { bin: fs.realpathSync(__filename) }).then((code) => {
    process.exitCode = code;
  });
}

function main(argv) {
  const [command, ...rest] = argv;
  if (SERVICE_COMMANDS.has(command)) return runService(command, rest);
  try {
    if (command === "setup") {
      if (rest.slice(0, rest.includes("--") ? rest.indexOf("--") : rest.length).some((arg) => arg === "-h" || arg === "--help")) {
        console.log(SETUP_USAGE);
        return;
      }
      setup(rest);
      return;
    }
    if (!command || command === "-h" || command === "--help" || rest.includes("-h") || rest.includes("--help")) {
      console.log(USAGE);
      return;
    }
    if (command !== "wooster-install") throw new UsageError(`unknown command ${command}`);
    install(rest);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`localmlx-client: ${error.message}`);
    if (command === "setup") console.error("See: localmlx-client setup --help");
    else if (!/Nothing was changed/.test(error.message)) console.error(`\n${USAGE}`);
    process.exitCode = 2;
  }
}

if (require.main === module) main(process.argv.slice(2));

module.exports = { install, notWooster, setup };
