// Run an exported TF.js layers model the way brainchop's web app does, in Node on the CPU.
//
// usage: node run_layers_model.mjs MODEL.json INPUT.f32 D H W OUTPUT.f32
//
// INPUT.f32 holds D*H*W little-endian float32 voxels (C order); OUTPUT.f32 receives the
// logits, D*H*W*2 float32 (channels last). The model is loaded with tf.loadLayersModel
// from model.json and the weight files its weightsManifest lists, read from disk; then,
// as the app does, every layer after the input is applied in turn to a volume of any size.
import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-cpu";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";

const [modelPath, inputPath, d, h, w, outputPath] = process.argv.slice(2);
const shape = [Number(d), Number(h), Number(w)];

function fromDisk(path) {
  return {
    async load() {
      const json = JSON.parse(readFileSync(path, "utf8"));
      const weightSpecs = [];
      const buffers = [];
      for (const group of json.weightsManifest) {
        weightSpecs.push(...group.weights);
        for (const file of group.paths) {
          const bytes = readFileSync(join(dirname(path), file));
          buffers.push(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
        }
      }
      return {
        modelTopology: json.modelTopology,
        weightSpecs,
        weightData: tf.io.concatenateArrayBuffers(buffers),
        format: json.format,
        generatedBy: json.generatedBy,
        convertedBy: json.convertedBy,
      };
    },
  };
}

await tf.setBackend("cpu");
const model = await tf.loadLayersModel(fromDisk(modelPath));
const raw = readFileSync(inputPath);
const voxels = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
let x = tf.tensor(voxels, [1, ...shape, 1]);
for (let i = 1; i < model.layers.length; i++) {
  const next = model.layers[i].apply(x);
  x.dispose();
  x = next;
}
const logits = await x.data();
writeFileSync(outputPath, Buffer.from(logits.buffer, logits.byteOffset, logits.byteLength));
console.log(JSON.stringify({
  backend: tf.getBackend(),
  layers: model.layers.map((l) => l.getClassName()),
  inputShape: model.inputs[0].shape,
  outputShape: x.shape,
}));
