/**
 * Images in chat messages (vision models, issue 22), against the real sidecar: the tiny Qwen2-VL
 * built by tests/vision_models.py through the client (`imagePart`: bytes as a data: URL, a file
 * path under LOCALMLX_ALLOWED_ROOTS) and through the OpenAI endpoint with the official `openai`
 * SDK (`image_url` parts); the refusals (a text-only model, bytes that are no image, an http URL
 * while they are off, a path outside the roots), each -32602 with its reason, or a 400 carrying
 * it; and the Wooster plugin's local_vision tool, with and without a vision model set.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import {
  ErrorCode,
  RpcError,
  imagePart,
  startOpenAIServer,
  textPart,
  type ContentPart,
  type LocalMLX,
  type Message,
  type OpenAIServer,
} from "../src/index";
import { readSettings } from "../wooster/config";
import { LocalMLXService } from "../wooster/service";
import { createTools } from "../wooster/tools";
import { modelsDir, python, repositoryRoot, startClient } from "./helpers";

const T = { timeout: 180_000 };
const QUESTION = "What is in this picture?";
const NOT_AN_IMAGE = `data:image/png;base64,${Buffer.from("these bytes are not an image").toString("base64")}`;
const HTTP_IMAGE = "http://127.0.0.1:9/picture.png"; // never fetched: URLs are off

/** The tiny vision model (built once per content digest) and two seeded PNGs written into `imagesDir`; returns the model's name. */
function buildVisionModel(imagesDir: string): string {
  const code = [
    "import sys",
    "from pathlib import Path",
    "from tests.vision_models import build, image",
    "for seed in (1, 2):",
    "    (Path(sys.argv[2]) / f'noise-{seed}.png').write_bytes(image(seed, 64, 48))",
    "(Path(sys.argv[2]) / 'noise-3.jpg').write_bytes(image(3, 64, 48, 'JPEG'))",
    "print(build(Path(sys.argv[1])))",
  ].join("\n");
  const built = spawnSync(python, ["-c", code, modelsDir, imagesDir], { cwd: repositoryRoot, encoding: "utf8" });
  if (built.status !== 0) throw new Error(`could not build the vision model: ${built.stderr}`);
  return basename(built.stdout.trim().split("\n").pop()!);
}

/** The -32602 a call is refused with, and its data's reason. */
function refusedFor(reason: string, more: Record<string, unknown> = {}): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof RpcError, String(error));
    assert.equal(error.code, ErrorCode.InvalidParams, error.message);
    assert.equal(error.data.reason, reason, JSON.stringify(error.data));
    for (const [key, value] of Object.entries(more)) assert.deepEqual(error.data[key], value, `data.${key}`);
    return true;
  };
}

const ask = (...content: ContentPart[]): Message[] => [{ role: "user", content }];

describe("vision", T, () => {
  const imagesDir = mkdtempSync(join(tmpdir(), "localmlx-vision-images-"));
  let vision: string;
  let png: Buffer;
  let mlx: LocalMLX;

  before(async () => {
    vision = buildVisionModel(imagesDir);
    png = readFileSync(join(imagesDir, "noise-1.png"));
    mlx = await startClient({ env: { LOCALMLX_ALLOWED_ROOTS: imagesDir } });
  });
  after(async () => {
    await mlx?.close();
    rmSync(imagesDir, { recursive: true, force: true });
  });

  describe("through the client", () => {
    test("the vision model says so; a chat with an image streams text, and the image's tokens count in promptTokens", async () => {
      assert.ok((await mlx.models.load(vision)).capabilities?.includes("vision"));
      assert.ok(!(await mlx.models.load("demo")).capabilities?.includes("vision"));

      const textOnly = await mlx.chat({ model: vision, messages: ask({ type: "text", text: QUESTION }), maxTokens: 6, temperature: 0 }).result;
      const prediction = mlx.chat({ model: vision, messages: ask(imagePart(png), { type: "text", text: QUESTION }), maxTokens: 6, temperature: 0 });
      let chunks = 0;
      let streamed = "";
      for await (const chunk of prediction) {
        chunks++;
        streamed += chunk.text;
      }
      const result = await prediction.result;
      assert.ok(chunks >= 1, "streamed at least one chunk");
      assert.equal(streamed, result.text);
      assert.ok(result.usage.completionTokens > 0);
      assert.ok(result.usage.promptTokens > textOnly.usage.promptTokens, `${result.usage.promptTokens} > ${textOnly.usage.promptTokens}`);
      const imageTokens = result.usage.imageTokens;
      assert.ok(imageTokens !== undefined && imageTokens > 0, `usage.imageTokens: ${imageTokens}`);
      assert.ok(result.usage.promptTokens - textOnly.usage.promptTokens >= imageTokens);
      assert.equal(textOnly.usage.imageTokens, undefined);
      // models/list says so too, for a model not loaded.
      await mlx.models.unload(vision);
      const listed = (await mlx.models.list()).find((m) => m.model === vision);
      assert.ok(listed?.capabilities?.includes("vision"), JSON.stringify(listed));
    });

    test("the same image as a data: URL and as a file path under the roots gives the same answer", async () => {
      const path = join(imagesDir, "noise-1.png");
      assert.equal(imagePart(path).image, path);
      assert.match(imagePart(png).image, /^data:image\/png;base64,iVBORw0KGgo/);
      const byBytes = await mlx.chat({ model: vision, messages: ask(imagePart(png), { type: "text", text: QUESTION }), maxTokens: 6, temperature: 0 }).result;
      const byPath = await mlx.chat({ model: vision, messages: ask(imagePart(path), { type: "text", text: QUESTION }), maxTokens: 6, temperature: 0 }).result;
      const byFileUrl = await mlx.chat({ model: vision, messages: ask({ type: "image", image: `file://${path}` }, { type: "text", text: QUESTION }), maxTokens: 6, temperature: 0 }).result;
      assert.deepEqual([byPath.text, byPath.usage.promptTokens], [byBytes.text, byBytes.usage.promptTokens]);
      assert.deepEqual([byFileUrl.text, byFileUrl.usage.promptTokens], [byBytes.text, byBytes.usage.promptTokens]);
    });

    test("imagePart: bytes as a typed data: URL, paths made absolute, URLs as given", async () => {
      const jpeg = readFileSync(join(imagesDir, "noise-3.jpg"));
      assert.match(imagePart(jpeg).image, /^data:image\/jpeg;base64,\/9j\//);
      assert.match(imagePart(new Uint8Array(png), "image/x-custom").image, /^data:image\/x-custom;base64,iVBORw0KGgo/);
      assert.equal(imagePart("pictures/cat.png").image, resolve("pictures/cat.png"));
      for (const url of ["https://example.com/a.png", "http://127.0.0.1/a.png", "file:///tmp/a.png", NOT_AN_IMAGE]) assert.equal(imagePart(url).image, url);
      assert.throws(() => imagePart(""), TypeError);
      assert.deepEqual(textPart("hi"), { type: "text", text: "hi" });
      // Another format, and an image with no text beside it.
      const result = await mlx.chat({ model: vision, messages: ask(imagePart(jpeg)), maxTokens: 2, temperature: 0 }).result;
      assert.ok(result.usage.completionTokens > 0);
    });

    test("refusals: a text-only model, bytes that are no image, an http URL while URLs are off, a path outside the roots", async () => {
      await assert.rejects(
        mlx.chat({ model: "demo", messages: ask(imagePart(png), { type: "text", text: QUESTION }) }).result,
        (error: unknown) => refusedFor("no-vision", { model: "demo" })(error) && /does not take images/.test((error as RpcError).rawMessage),
      );
      await assert.rejects(
        mlx.chat({ model: vision, messages: ask({ type: "text", text: QUESTION }, { type: "image", image: NOT_AN_IMAGE }) }).result,
        refusedFor("not-an-image", { path: "/messages/0/content/1" }),
      );
      await assert.rejects(
        mlx.chat({ model: vision, messages: ask({ type: "image", image: HTTP_IMAGE }) }).result,
        refusedFor("urls-not-allowed", { path: "/messages/0/content/0" }),
      );
      await assert.rejects(
        mlx.chat({ model: vision, messages: ask(imagePart(join(repositoryRoot, "README.md"))) }).result,
        refusedFor("outside-roots", { path: "/messages/0/content/0" }),
      );
      await assert.rejects(
        mlx.chat({ model: vision, messages: ask(imagePart(join(imagesDir, "missing.png"))) }).result,
        refusedFor("not-found", { path: "/messages/0/content/0" }),
      );
      // The session goes on serving.
      assert.ok((await mlx.chat({ model: vision, messages: ask(imagePart(png)), maxTokens: 2 }).result).usage.completionTokens > 0);
    });
  });

  describe("through the OpenAI endpoint with the openai SDK", () => {
    let server: OpenAIServer;
    let openai: OpenAI;
    const dataUrl = (): string => `data:image/png;base64,${png.toString("base64")}`;
    const withImage = (url: string): OpenAI.ChatCompletionMessageParam[] => [
      { role: "user", content: [{ type: "text", text: QUESTION }, { type: "image_url", image_url: { url, detail: "low" } }] },
    ];

    before(async () => {
      server = await startOpenAIServer({ client: mlx, port: 0, fallback: false });
      openai = new OpenAI({ baseURL: server.url, apiKey: "unused", maxRetries: 0 });
    });
    after(async () => {
      await server?.close();
    });

    test("image_url parts reach the vision model: streamed text, the image counted in prompt_tokens", async () => {
      const textOnly = await openai.chat.completions.create({ model: vision, messages: [{ role: "user", content: [{ type: "text", text: QUESTION }] }], max_tokens: 6, temperature: 0 });
      let streamed = "";
      let promptTokens = 0;
      const stream = await openai.chat.completions.create({
        model: vision,
        messages: withImage(dataUrl()),
        max_tokens: 6,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
      });
      for await (const chunk of stream) {
        streamed += chunk.choices[0]?.delta?.content ?? "";
        if (chunk.usage) promptTokens = chunk.usage.prompt_tokens;
      }
      assert.ok(promptTokens > textOnly.usage!.prompt_tokens, `${promptTokens} > ${textOnly.usage!.prompt_tokens}`);
      const own = await mlx.chat({ model: vision, messages: ask({ type: "text", text: QUESTION }, imagePart(png)), maxTokens: 6, temperature: 0 }).result;
      assert.equal(streamed, own.text);
    });

    test("refusals are 400s carrying the reason: a text-only model, bytes that are no image, an http URL while URLs are off, an unknown part", async () => {
      await assert.rejects(
        openai.chat.completions.create({ model: "demo", messages: withImage(dataUrl()) }),
        (error: unknown) => error instanceof OpenAI.BadRequestError && error.code === "no_vision" && error.param === "messages" && /does not take images/.test(error.message),
      );
      await assert.rejects(
        openai.chat.completions.create({ model: vision, messages: withImage(NOT_AN_IMAGE) }),
        (error: unknown) => error instanceof OpenAI.BadRequestError && error.code === "not_an_image" && error.param === "messages[0].content[1]",
      );
      await assert.rejects(
        openai.chat.completions.create({ model: vision, messages: withImage(HTTP_IMAGE), stream: true }),
        (error: unknown) => error instanceof OpenAI.BadRequestError && error.code === "urls_not_allowed" && error.param === "messages[0].content[1]",
      );
      await assert.rejects(
        openai.chat.completions.create({
          model: vision,
          messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: dataUrl() } }, { type: "input_audio", input_audio: { data: "", format: "wav" } }] }],
        }),
        (error: unknown) => error instanceof OpenAI.BadRequestError && error.param === "messages[0].content[1].type",
      );
      await assert.rejects(
        openai.chat.completions.create({ model: vision, messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "" } }] }] }),
        (error: unknown) => error instanceof OpenAI.BadRequestError && error.param === "messages[0].content[0].image_url.url",
      );
    });
  });

  describe("the Wooster plugin's local_vision", () => {
    const services: LocalMLXService[] = [];
    const serviceWith = (env: Record<string, string>): LocalMLXService => {
      const settings = readSettings(undefined, { LOCALMLX_PYTHON: python, LOCALMLX_MODELS_DIR: modelsDir, LOCALMLX_ALLOWED_ROOTS: imagesDir, LOCALMLX_MAX_TOKENS: "6", ...env });
      const service = new LocalMLXService(settings, () => undefined);
      services.push(service);
      return service;
    };
    const run = async (service: LocalMLXService, input: string): Promise<string> => {
      const tool = createTools(service, () => undefined).find((t) => t.name === "local_vision");
      assert.ok(tool, "the plugin offers local_vision");
      return (await tool.invoke(input)) as string;
    };
    after(async () => {
      await Promise.all(services.map((service) => service.dispose()));
    });

    test("without a vision model: a message saying how to set one, and no sidecar started", async () => {
      const service = serviceWith({});
      const answer = await run(service, join(imagesDir, "noise-1.png"));
      assert.match(answer, /^local_vision has no vision model: set LOCALMLX_VISION_MODEL/);
      assert.equal(service.pid, undefined);
      assert.match(await run(service, ""), /^local_vision needs an image file/);
    });

    test("with LOCALMLX_VISION_MODEL: describes the image, answers a question; a text-only model, a missing file, a file that is no image are clear messages", async () => {
      const service = serviceWith({ LOCALMLX_VISION_MODEL: vision });
      const path = join(imagesDir, "noise-2.png");
      const listed = await createTools(service, () => undefined).find((t) => t.name === "list_local_models")!.invoke("");
      assert.match(listed as string, new RegExp(`^- ${vision} \\([^)]*\\) \\[vision\\]$`, "m"));
      assert.match(listed as string, /^- demo \(/m);
      assert.doesNotMatch(listed as string, /^- demo .*vision/m);
      const described = await run(service, path);
      assert.doesNotMatch(described, /could not|no vision model|served by/);
      assert.ok(described.trim().length > 0);
      const asked = await run(service, JSON.stringify({ path, question: "What colour is it?", maxTokens: 4, temperature: 0 }));
      const own = await (await service.mlx()).chat({ model: vision, messages: ask(imagePart(path), { type: "text", text: "What colour is it?" }), maxTokens: 4, temperature: 0 }).result;
      assert.equal(asked, own.text.trim() || "(the model returned no text)");

      assert.match(await run(service, JSON.stringify({ path, model: "demo" })), /^The model demo does not take images \(it can: [^)]*chat[^)]*\)\. Name a vision-language model/);
      assert.match(await run(service, join(imagesDir, "missing.png")), /^There is no image file at .*missing\.png\.$/);
      // A file anywhere the user can read is sent as its bytes (no LOCALMLX_ALLOWED_ROOTS needed): one that is no image is named as such.
      assert.match(await run(service, join(repositoryRoot, "README.md")), /^local_vision could not use \S*README\.md: the bytes are not an image/);
      assert.match(await run(service, JSON.stringify({ path: NOT_AN_IMAGE })), /^local_vision could not use data:image\/png;base64,\S*…: the bytes are not an image/);
    });

    test("a configured model without vision: a clear message, not a throw", async () => {
      const service = serviceWith({ LOCALMLX_VISION_MODEL: "demo" });
      assert.match(await run(service, join(imagesDir, "noise-1.png")), /^The model demo does not take images[^.]*\. Set LOCALMLX_VISION_MODEL to a vision-language model/);
    });
  });
});
