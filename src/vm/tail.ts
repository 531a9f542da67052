// The last bytes of a stream, kept for the log: a VM's console and QEMU's stderr.

export class Tail {
  #max: number
  #buffer = Buffer.alloc(0)

  constructor(max: number) {
    this.#max = max
  }

  push(chunk: Buffer): void {
    const joined = Buffer.concat([this.#buffer, chunk])
    this.#buffer = joined.length > this.#max ? joined.subarray(joined.length - this.#max) : joined
  }

  text(): string {
    return this.#buffer.toString('utf8')
  }
}
