/** Finding the sidecar without LOCALMLX_PYTHON, and a host's own `sidecar/` folder never standing in for it. */
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { findSidecar, LocalMLX, privateVenvDir, SidecarStartError } from "../src/index";
import { modelsDir, python, repositoryRoot } from "./helpers";

const T = { timeout: 60_000 };
const scratch = mkdtempSync(join(tmpdir(), "localmlx-discovery-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

function executable(file: string, body: string): string {
  mkdirSync(join(file, ".."), { recursive: true });
  writeFileSync(file, body);
  chmodSync(file, 0o755);
  return file;
}

/** A folder with a decoy `sidecar` package, as a host app might have. */
function hostWithDecoy(name: string): string {
  const host = join(scratch, name);
  mkdirSync(join(host, "sidecar"), { recursive: true });
  writeFileSync(join(host, "sidecar", "__init__.py"), "");
  writeFileSync(
    join(host, "sidecar", "__main__.py"),
    "import sys\nsys.stderr.write('HIJACKED: the host app sidecar package ran\\n')\nsys.exit(7)\n",
  );
  return host;
}

describe("findSidecar", () => {
  test("the order: option, LOCALMLX_PYTHON, localmlx on PATH, private virtualenv, checkout .venv, python3", () => {
    const bin = join(scratch, "bin");
    const entry = executable(join(bin, "localmlx"), "#!/bin/sh\nexit 1\n");
    executable(join(bin, "python3"), "#!/bin/sh\nexit 1\n");
    const venv = join(scratch, "private-venv");
    const venvPy = executable(join(venv, "bin", "python"), "#!/bin/sh\nexit 1\n");
    const env = { PATH: bin, HOME: join(scratch, "home"), LOCALMLX_VENV: venv };

    const all = findSidecar({ env });
    assert.deepEqual(
      all.map((c) => c.source),
      ["option", "LOCALMLX_PYTHON", "PATH", "private-venv", "checkout", "python3"],
    );
    assert.equal(all[0]!.skipped, "not given");
    assert.equal(all[1]!.skipped, "not set");
    assert.equal(all[2]!.command, entry);
    assert.deepEqual(all[2]!.args, ["serve"], "the entry point runs `localmlx serve`");
    assert.equal(all[3]!.command, venvPy);
    assert.deepEqual(all[3]!.args, ["-P", "-m", "sidecar", "serve"], "a Python outside the checkout runs isolated");
    assert.equal(all[3]!.cwd, undefined, "…in the host's cwd, which -P keeps off sys.path");
    assert.equal(all[4]!.command, join(repositoryRoot, ".venv", "bin", "python"));
    assert.equal(all[4]!.cwd, repositoryRoot);
    assert.equal(all[5]!.command, join(bin, "python3"));

    const bare = findSidecar({ env: { PATH: join(scratch, "empty"), HOME: join(scratch, "home") } });
    assert.match(bare[2]!.skipped!, /not found/);
    assert.match(bare[3]!.skipped!, /npx @localmlx\/client setup/);
    assert.equal(bare[3]!.label, `the private virtualenv ${join(scratch, "home", ".local", "share", "localmlx", "venv")}`);
  });

  test("the python option, else LOCALMLX_PYTHON, is the only candidate", () => {
    const env = { LOCALMLX_PYTHON: "/opt/py/bin/python", PATH: "" };
    assert.deepEqual(
      findSidecar({ python: "/usr/bin/python3.12", env }).map((c) => [c.source, c.command]),
      [["option", "/usr/bin/python3.12"]],
    );
    assert.deepEqual(findSidecar({ env }).map((c) => [c.source, c.command]), [["LOCALMLX_PYTHON", "/opt/py/bin/python"]]);
    // Another working directory than the checkout: -P.
    assert.deepEqual(findSidecar({ env, cwd: scratch })[0]!.args, ["-P", "-m", "sidecar", "serve"]);
    assert.deepEqual(findSidecar({ env, args: ["x.py"] })[0]!.args, ["x.py"]);
  });

  test("privateVenvDir: LOCALMLX_VENV, else XDG_DATA_HOME, else ~/.local/share", () => {
    assert.equal(privateVenvDir({ LOCALMLX_VENV: "/v" }), "/v");
    assert.equal(privateVenvDir({ XDG_DATA_HOME: "/data", HOME: "/h" }), "/data/localmlx/venv");
    assert.equal(privateVenvDir({ HOME: "/h" }), "/h/.local/share/localmlx/venv");
  });
});

describe("starting without LOCALMLX_PYTHON", () => {
  test("a broken entry point and a broken private virtualenv are passed over; the checkout's .venv serves", T, async () => {
    const bin = join(scratch, "broken-bin");
    executable(join(bin, "localmlx"), "#!/bin/sh\necho 'broken entry point' >&2\nexit 4\n");
    const home = join(scratch, "broken-home");
    executable(join(home, ".local", "share", "localmlx", "venv", "bin", "python"), "#!/bin/sh\necho 'broken venv' >&2\nexit 5\n");
    const mlx = await LocalMLX.start({
      env: { LOCALMLX_PYTHON: undefined, LOCALMLX_VENV: undefined, XDG_DATA_HOME: undefined, PATH: bin, HOME: home, LOCALMLX_MODELS_DIR: modelsDir },
    });
    try {
      assert.equal(mlx.sidecar?.source, "checkout");
      assert.equal(mlx.sidecar?.command, join(repositoryRoot, ".venv", "bin", "python"));
      await mlx.ping();
    } finally {
      await mlx.close();
    }
  });

  test("a Python that does not exist, named by the host: SidecarStartError naming it", T, async () => {
    await assert.rejects(LocalMLX.start({ env: { LOCALMLX_PYTHON: "/nonexistent/python3" } }), (error: unknown) => {
      assert.ok(error instanceof SidecarStartError);
      assert.match(error.message, /\/nonexistent\/python3.*ENOENT/);
      return true;
    });
  });
});

describe("a sidecar/ folder in the host's working directory", () => {
  test("cannot stand in for the sidecar (python -P -m sidecar)", T, async () => {
    const host = hostWithDecoy("host-app");
    const lines: string[] = [];
    const mlx = await LocalMLX.start({ python, cwd: host, env: { LOCALMLX_MODELS_DIR: modelsDir }, logger: { info: (l) => lines.push(l), error: (l) => lines.push(l) } });
    try {
      assert.deepEqual(mlx.sidecar?.args, ["-P", "-m", "sidecar", "serve"]);
      assert.equal(mlx.info?.serverInfo.name, "localmlx");
      assert.ok(!lines.some((line) => line.includes("HIJACKED")));
    } finally {
      await mlx.close();
    }
  });

  test("nor with the private virtualenv's Python, from the host's own cwd", T, async () => {
    const host = hostWithDecoy("host-app-2");
    const home = join(scratch, "venv-home");
    // A "private virtualenv" whose python runs the project's Python.
    const venv = join(home, ".local", "share", "localmlx", "venv");
    executable(join(venv, "bin", "python"), `#!/bin/sh\nexec ${python} "$@"\n`);
    const mlx = await LocalMLX.start({
      cwd: host,
      env: { LOCALMLX_PYTHON: undefined, PATH: join(scratch, "empty"), HOME: home, LOCALMLX_MODELS_DIR: modelsDir },
    });
    try {
      assert.equal(mlx.sidecar?.source, "private-venv");
      assert.equal(mlx.sidecar?.cwd, host);
      await mlx.ping();
    } finally {
      await mlx.close();
    }
  });
});
