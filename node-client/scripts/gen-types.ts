/**
 * Generates src/protocol.ts from ../protocol/schema/protocol.schema.json (the single source of
 * truth): one type per `$defs` entry, one interface per method's params and result and per
 * notification's params, a `Methods` map and a `Notifications` map, and the constants:
 * `PROTOCOL_VERSION`, `ErrorCodes` (from `$defs/ErrorCode`), `METHOD_NAMES`,
 * `NOTIFICATION_NAMES`, `GENERATION_DEFAULTS` (the `default`s of `$defs/GenerationParams`).
 * scripts/gen_protocol_defs.py generates the same constants for Python.
 *
 *   tsx scripts/gen-types.ts            rewrite src/protocol.ts
 *   tsx scripts/gen-types.ts --check    exit 1 when src/protocol.ts differs from the schema
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { compile, type JSONSchema } from "json-schema-to-typescript";

type Schema = { [key: string]: unknown };
type Entry = { params: Schema; result?: Schema; direction?: string };

const packageRoot = resolve(__dirname, "..");
const schemaPath = resolve(packageRoot, "..", "protocol", "schema", "protocol.schema.json");
const outputPath = join(packageRoot, "src", "protocol.ts");

/** "models/list" -> "ModelsList", "$/cancelRequest" -> "CancelRequest". */
function pascal(name: string): string {
  return name
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean)
    .map((part) => part[0]!.toUpperCase() + part.slice(1))
    .join("");
}

/** json-schema-to-typescript resolves `#/definitions/...`; the schema uses draft 2020-12 `$defs`. */
function toDefinitions(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(toDefinitions);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(
    Object.entries(value).map(([key, item]) => [
      key,
      key === "$ref" && typeof item === "string" ? item.replace("#/$defs/", "#/definitions/") : toDefinitions(item),
    ]),
  );
}

/** "MODEL_NOT_FOUND" -> "ModelNotFound". */
function pascalFromSnake(name: string): string {
  return name
    .toLowerCase()
    .split("_")
    .map((part) => part[0]!.toUpperCase() + part.slice(1))
    .join("");
}

/**
 * A params object that takes shared properties by a `$ref` beside its own (2020-12:
 * `"$ref": "#/$defs/GenerationParams", "properties": {...}, "unevaluatedProperties": false`)
 * becomes `allOf: [ref, own]`, which json-schema-to-typescript renders as `Shared & { own }`
 * (it ignores a `$ref`'s siblings).
 */
function sharedAsAllOf(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sharedAsAllOf);
  if (value === null || typeof value !== "object") return value;
  const node = Object.fromEntries(Object.entries(value).map(([key, item]) => [key, sharedAsAllOf(item)])) as Schema;
  if (typeof node.$ref !== "string" || node.properties === undefined) return node;
  const { $ref, unevaluatedProperties: _closed, description, ...own } = node;
  return { ...(description === undefined ? {} : { description }), allOf: [{ $ref }, own] };
}

function jsDoc(text: string, indent = ""): string {
  return `${indent}/** ${text.replace(/\*\//g, "*\\/")} */`;
}

function refName(schema: Schema): string | undefined {
  const keys = Object.keys(schema).filter((key) => key !== "description");
  const ref = schema.$ref;
  return keys.length === 1 && typeof ref === "string" ? ref.split("/").pop() : undefined;
}

async function render(): Promise<string> {
  const schema = JSON.parse(readFileSync(schemaPath, "utf8")) as {
    $defs: Record<string, Schema>;
    methods: Record<string, Entry>;
    notifications: Record<string, Entry>;
  };
  const definitions: Record<string, Schema> = {};
  for (const [name, def] of Object.entries(schema.$defs)) {
    definitions[name] = { ...(toDefinitions(def) as Schema), title: name };
  }

  async function declare(name: string, part: Schema): Promise<string> {
    const target = refName(part);
    if (target !== undefined) return `export type ${name} = ${target};\n`;
    const root = { ...(toDefinitions(sharedAsAllOf(part)) as Schema), title: name, definitions } as JSONSchema;
    return compile(root, name, {
      bannerComment: "",
      declareExternallyReferenced: false,
      additionalProperties: false,
      ignoreMinAndMaxItems: true,
      strictIndexSignatures: true,
      unknownAny: true,
      format: true,
    });
  }

  const constants = ["// ---- Constants ----\n"];
  const protocolVersion = schema.$defs.ProtocolVersion as { const: number; description?: string };
  if (protocolVersion.description) constants.push(jsDoc(protocolVersion.description));
  constants.push(`export const PROTOCOL_VERSION = ${JSON.stringify(protocolVersion.const)} as const;\n`);
  const errorCode = schema.$defs.ErrorCode as { description?: string; oneOf: { const: number; title: string; description: string }[] };
  if (errorCode.description) constants.push(jsDoc(errorCode.description));
  constants.push("export const ErrorCodes = {");
  for (const entry of errorCode.oneOf) {
    constants.push(jsDoc(entry.description, "  "), `  ${pascalFromSnake(entry.title)}: ${entry.const},`);
  }
  constants.push("} as const;", "", "export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];", "");
  const defaults = Object.entries((schema.$defs.GenerationParams as { properties: Record<string, Schema> }).properties)
    .filter(([, spec]) => "default" in spec)
    .map(([name, spec]) => `  ${name}: ${JSON.stringify(spec.default)},`);
  constants.push(
    "/** What an absent chat/generate param means; maxTokens and temperature default to the server's settings. */",
    "export const GENERATION_DEFAULTS = {",
    ...defaults,
    "} as const;",
    "",
  );

  const sections: string[] = [];
  sections.push("// ---- Shared definitions ($defs) ----\n");
  for (const name of Object.keys(schema.$defs)) {
    if (name === "ErrorCode") continue; // ErrorCodes and ErrorCode, above
    sections.push(await declare(name, schema.$defs[name]!));
  }

  const methodRows: string[] = [];
  sections.push("// ---- Methods: params and result of each request ----\n");
  for (const [method, entry] of Object.entries(schema.methods)) {
    const base = pascal(method);
    sections.push(await declare(`${base}Params`, entry.params));
    sections.push(await declare(`${base}Result`, entry.result ?? {}));
    methodRows.push(`  ${JSON.stringify(method)}: { params: ${base}Params; result: ${base}Result };`);
  }

  const notificationRows: string[] = [];
  sections.push("// ---- Notifications ----\n");
  for (const [method, entry] of Object.entries(schema.notifications)) {
    const base = pascal(method);
    sections.push(await declare(`${base}Params`, entry.params));
    notificationRows.push(
      `  ${JSON.stringify(method)}: { direction: ${JSON.stringify(entry.direction ?? "server")}; params: ${base}Params };`,
    );
  }

  const source = relative(packageRoot, schemaPath).split("\\").join("/");
  return [
    "/* eslint-disable */",
    `// Generated by scripts/gen-types.ts from ${source}: do not edit by hand.`,
    "// Regenerate with `npm run gen:types`; `npm run check:types` fails when this file drifts.",
    "",
    constants.join("\n"),
    sections.join("\n"),
    "// ---- Maps ----",
    "",
    "/** Every request method: its params and its result. */",
    "export interface Methods {",
    ...methodRows,
    "}",
    "",
    "export type MethodName = keyof Methods;",
    "export type ParamsOf<M extends MethodName> = Methods[M][\"params\"];",
    "export type ResultOf<M extends MethodName> = Methods[M][\"result\"];",
    "",
    "/** Every notification, with the side that sends it. */",
    "export interface Notifications {",
    ...notificationRows,
    "}",
    "",
    "export type NotificationName = keyof Notifications;",
    "",
    `export const METHOD_NAMES = ${JSON.stringify(Object.keys(schema.methods))} as const;`,
    `export const NOTIFICATION_NAMES = ${JSON.stringify(Object.keys(schema.notifications))} as const;`,
    "",
  ].join("\n");
}

async function main(): Promise<void> {
  const generated = await render();
  if (process.argv.includes("--check")) {
    let current = "";
    try {
      current = readFileSync(outputPath, "utf8");
    } catch {
      // missing counts as drift
    }
    if (current !== generated) {
      const have = current.split("\n");
      const want = generated.split("\n");
      let line = 0;
      while (line < want.length && have[line] === want[line]) line++;
      console.error(
        `${relative(process.cwd(), outputPath)} is out of date with ${relative(process.cwd(), schemaPath)}: ` +
          "run `npm run gen:types` and commit the result.\n" +
          `first difference at line ${line + 1}:\n- ${have[line] ?? "(end of file)"}\n+ ${want[line] ?? "(end of file)"}`,
      );
      process.exit(1);
    }
    console.log(`${relative(process.cwd(), outputPath)} matches the schema.`);
    return;
  }
  writeFileSync(outputPath, generated);
  console.log(`wrote ${relative(process.cwd(), outputPath)}`);
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
