// AudioWorklet processors of the live-speech page (runs at the AudioContext's rate, 24 kHz).
// "pcm-capture": posts the microphone's samples in blocks of `chunk` frames (Float32Array, transferred).
// "pcm-player": plays queued Float32Array chunks tagged with their item id; counts the samples played per item;
//   {type: "flush"} drops what is queued and answers {type: "flushed", played: {item: samples}}.

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = (options.processorOptions && options.processorOptions.chunk) || 960;
    this.buf = new Float32Array(this.chunk);
    this.n = 0;
  }
  process(inputs) {
    const input = inputs[0];
    if (input && input[0]) {
      const x = input[0];
      for (let i = 0; i < x.length; i++) {
        this.buf[this.n++] = x[i];
        if (this.n === this.chunk) {
          this.port.postMessage(this.buf, [this.buf.buffer]);
          this.buf = new Float32Array(this.chunk);
          this.n = 0;
        }
      }
    }
    return true;
  }
}

class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];   // [{item, samples, pos}]
    this.played = {};  // item -> samples played
    this.blocks = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "chunk") {
        this.queue.push({ item: m.item, samples: m.samples, pos: 0 });
      } else if (m.type === "flush") {
        this.queue = [];
        this.port.postMessage({ type: "flushed", played: this.played });
      }
    };
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const c = this.queue[0];
      const n = Math.min(out.length - i, c.samples.length - c.pos);
      out.set(c.samples.subarray(c.pos, c.pos + n), i);
      c.pos += n;
      i += n;
      this.played[c.item] = (this.played[c.item] || 0) + n;
      if (c.pos === c.samples.length) this.queue.shift();
    }
    out.fill(0, i);
    if (i > 0 && ++this.blocks % 8 === 0) this.port.postMessage({ type: "played", played: this.played });
    if (i > 0 && !this.queue.length) this.port.postMessage({ type: "played", played: this.played, idle: true });
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
registerProcessor("pcm-player", PcmPlayer);
