// Audio worklet that hands the microphone's raw samples to the page (recorded as WAV there, so
// the server never has to decode a browser-specific container such as webm).
class RecorderProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("recorder", RecorderProcessor);
