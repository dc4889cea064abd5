#!/usr/bin/env node
// `npx @localmlx/client setup`: creates a private virtualenv and pip-installs the localmlx sidecar
// into it, where the client finds it (see findSidecar in src/process.ts).
// `npx @localmlx/client wooster-install <wooster-dir>`: puts the localMLX plugin into a Wooster
// checkout (src/plugins/localMLX/) and adds @localmlx/client to its package.json, then runs the
// package manager non-interactively and checks that the package resolves from the plugin folder.
// Safe to run again: it only writes what differs. It refuses a directory that is not Wooster.
// `npx @localmlx/client wooster-doctor <wooster-dir>`: says whether Wooster will stay local, each
// finding with its fix (src/wooster-readiness.ts); exit 0 when it will, 1 when not, 2 for usage.
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
       localmlx-client wooster-doctor <wooster-dir> [--json]

wooster-install copies the localMLX plugin into <wooster-dir>/${PLUGIN_DIR}/, adds
${DEPENDENCY} to Wooster's package.json, installs it with Wooster's package manager (pnpm,
npm or yarn, non-interactively), and checks that it resolves from the plugin folder; it exits 1
when it does not. Run it again to update; it changes only what differs.

  --spec <spec>    the dependency as package.json should name it (default: this package's
                   folder when it lives in a localmlx checkout, "link:" for pnpm and yarn,
                   "file:" for npm; else "^<version>")
  --no-install     edit package.json only; run your package manager yourself
  --dry-run        say what would change, change nothing

wooster-doctor checks the Node version, the plugin and its package, the settings (<wooster-dir>/.env
under this shell's environment, as Wooster reads them), and asks each endpoint Wooster will call
(ROUTING_LOCAL_SERVER_URL, ROUTING_ROUTER_URL, ROUTING_FAST_URL, ROUTING_THINKING_URL,
MLX_EMBEDDINGS_URL) and the embedding model. It prints each finding with its fix, and exits 0
when Wooster will stay local, 1 when it will not (or will fall back), 2 for usage.

  --json           the findings as JSON ({ dir, staysLocal, findings: [{ id, level, message, fix }] })
  -h, --help       this text`;

class UsageError extends Error {}
/** The install did not give a working plugin: exit 1, with what to run. */
class InstallFailure extends Error {}

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

/**
 * The install, with nothing left to ask: stdin is closed, and each manager told not to prompt.
 * pnpm: CI=true and confirmModulesPurge=false (else, on a non-terminal, it asks whether to purge
 * node_modules and exits 0 having done nothing); CI=true makes it freeze the lockfile, which the
 * changed dependency needs updated. yarn: classic's --non-interactive; Berry (a .yarnrc.yml) has
 * no prompts but is immutable under CI.
 */
function installCommand(dir, manager) {
  if (manager === "pnpm") return { args: ["install", "--config.confirmModulesPurge=false", "--no-frozen-lockfile"], env: { CI: "true" } };
  if (manager === "yarn") {
    const berry = fs.existsSync(path.join(dir, ".yarnrc.yml"));
    return { args: berry ? ["install"] : ["install", "--non-interactive"], env: { YARN_ENABLE_IMMUTABLE_INSTALLS: "false" } };
  }
  return { args: ["install", "--no-audit", "--no-fund"], env: {} };
}

function shown(manager, command) {
  return [...Object.entries(command.env).map(([k, v]) => `${k}=${v}`), manager, ...command.args].join(" ");
}

/**
 * Why @localmlx/client does not resolve from the plugin folder as Wooster will import it, or
 * undefined when it does. Asked of a fresh node: this process's require would find this package
 * itself (self-reference), and keeps what it read before the install (package.json lookups).
 */
function unresolved(dir) {
  const from = path.join(dir, PLUGIN_DIR, "index.js");
  const probe = `
    const req = require("node:module").createRequire(${JSON.stringify(from)});
    try { req.resolve(${JSON.stringify(DEPENDENCY)}); }
    catch (error) {
      let pkg; try { pkg = require("node:fs").realpathSync(require("node:path").dirname(req.resolve(${JSON.stringify(`${DEPENDENCY}/package.json`)}))); } catch {}
      console.log(pkg ? "built:" + pkg + "\t" + error.message.split("\\n")[0] : "missing");
    }`;
  const run = spawnSync(process.execPath, ["-e", probe], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  const answer = run.stdout.trim();
  if (run.status === 0 && answer === "") return undefined;
  if (answer.startsWith("built:")) {
    const [where, why] = answer.slice("built:".length).split("\t");
    return `${DEPENDENCY} is installed (${where}) but its entry point is missing (${why}); is it built? (\`npm run build\` in that folder)`;
  }
  return `${DEPENDENCY} does not resolve from ${path.dirname(from)}`;
}

function defaultSpec(dir, manager) {
  const inCheckout = fs.existsSync(path.join(packageRoot, "..", "sidecar", "__main__.py"));
  if (inCheckout) {
    let relative = path.relative(dir, packageRoot).split(path.sep).join("/");
    if (!relative.startsWith(".")) relative = `./${relative}`;
    // A symlink to the checkout: pnpm's and yarn's link:; npm's file: links folders itself.
    return `${manager === "npm" ? "file" : "link"}:${relative}`;
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

  const command = installCommand(dir, manager);
  const missing = unresolved(dir);
  if (options.install && !options.dryRun && (changes.length > 0 || missing)) {
    out(`running ${shown(manager, command)} in ${dir} …`);
    const run = spawnSync(manager, command.args, {
      cwd: dir,
      stdio: ["ignore", "inherit", "inherit"],
      env: { ...process.env, ...command.env },
      shell: process.platform === "win32",
    });
    const ran = run.error ? `could not run ${manager} (${run.error.code ?? run.error.message})` : run.status !== 0 ? `${manager} install failed (exit ${run.status ?? run.signal})` : undefined;
    const still = ran ? undefined : unresolved(dir);
    if (ran || still) {
      throw new InstallFailure(
        [
          ran ?? `${manager} install finished (exit 0), but ${still}: Wooster cannot load the plugin.`,
          `Run it yourself, then check:`,
          `  cd ${dir} && ${shown(manager, command)}`,
          `  npx ${DEPENDENCY} wooster-doctor ${dir}`,
        ].join("\n"),
      );
    }
    out(`${DEPENDENCY} resolves from ${PLUGIN_DIR}.`);
  } else if (!options.install && (changes.length > 0 || missing)) {
    out(`next: run \`${shown(manager, command)}\` in ${dir}.`);
  }
  if (changes.length > 0 && !options.dryRun) {
    out(
      [
        "",
        "Enable it in Wooster's .env:",
        "  PLUGIN_LOCALMLX_ENABLED=true",
        "  LOCALMLX_PYTHON=/path/to/localmlx/.venv/bin/python   # the Python with localmlx and MLX",
        "  LOCALMLX_DEFAULT_MODEL=mlx-community/Qwen2.5-3B-Instruct-4bit",
        "See the \"Use it from Wooster\" section of @localmlx/client's README for the other settings,",
        `and run \`npx ${DEPENDENCY} wooster-doctor ${dir}\`: it says what else Wooster needs to stay local.`,
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

// ---- wooster-doctor: will Wooster stay local? ------------------------------------------------

const MARK = { ok: "ok  ", warn: "WARN", fail: "FAIL" };

function parseDoctorArgs(argv) {
  const options = { json: false, dir: undefined };
  for (const arg of argv) {
    if (arg === "--json") options.json = true;
    else if (arg.startsWith("-")) throw new UsageError(`unknown option ${arg}`);
    else if (options.dir === undefined) options.dir = arg;
    else throw new UsageError(`unexpected argument ${arg}`);
  }
  if (!options.dir) throw new UsageError("which Wooster checkout? give its directory");
  return options;
}

async function doctor(argv, out = console.log) {
  const options = parseDoctorArgs(argv);
  const dir = path.resolve(options.dir);
  const why = notWooster(dir);
  if (why) throw new UsageError(`not a Wooster checkout: ${why}. Nothing was checked.`);
  let readiness;
  try {
    readiness = require(path.join(packageRoot, "dist", "index.js"));
  } catch {
    throw new UsageError("this package is not built (no dist/): run `npm run build` in it first");
  }
  const { env, dotenvFile } = readiness.readWoosterEnv(dir);
  const { staysLocal, findings } = await readiness.checkWooster({ dir, env });
  if (options.json) {
    out(JSON.stringify({ dir, dotenv: dotenvFile ?? null, staysLocal, findings }, null, 2));
  } else {
    const settings = dotenvFile ? `settings from ${dotenvFile}` : `no ${path.join(dir, ".env")} (create one)`;
    out(`Wooster at ${dir}: ${settings} under this shell's environment ("set X=…" means in that .env).`);
    for (const finding of findings) {
      out(`  ${MARK[finding.level]}  ${finding.id.padEnd(20)} ${finding.message}`);
      if (finding.fix && finding.level !== "ok") out(`        ${"".padEnd(20)} fix: ${finding.fix}`);
    }
    const count = (level) => findings.filter((f) => f.level === level).length;
    const warnings = count("warn") ? ` (${count("warn")} warning${count("warn") > 1 ? "s" : ""})` : "";
    out(staysLocal ? `\nWooster will stay local${warnings}.` : `\nWooster will NOT stay local: ${count("fail")} FAIL above${warnings}.`);
  }
  return staysLocal;
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
    if (command === "wooster-doctor") {
      doctor(rest).then((staysLocal) => (process.exitCode = staysLocal ? 0 : 1), (error) => failed(command, error));
      return;
    }
    if (command !== "wooster-install") throw new UsageError(`unknown command ${command}`);
    install(rest);
  } catch (error) {
    failed(command, error);
  }
}

/** A usage error exits 2 (with the usage); a failed install exits 1; anything else is a bug and throws. */
function failed(command, error) {
  if (!(error instanceof UsageError || error instanceof InstallFailure)) throw error;
  console.error(`localmlx-client: ${error.message}`);
  if (error instanceof InstallFailure) {
    process.exitCode = 1;
    return;
  }
  if (command === "setup") console.error("See: localmlx-client setup --help");
  else if (!/Nothing was (changed|checked)/.test(error.message)) console.error(`\n${USAGE}`);
  process.exitCode = 2;
}

if (require.main === module) main(process.argv.slice(2));

module.exports = { doctor, install, notWooster, setup };
