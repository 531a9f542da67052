// SerialConsole: the tail of a VM's serial console, its ready line, and lines awaited.

import { PassThrough } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { SerialConsole } from '../../../src/vm/console.js'

function makeConsole(options = { tailBytes: 256, readyLine: 'vmcgi: ready' }): { output: PassThrough; console: SerialConsole } {
  const output = new PassThrough()
  return { output, console: new SerialConsole(output, options) }
}

describe('SerialConsole', () => {
  it('keeps the last tailBytes of the output', () => {
    const { output, console: tty } = makeConsole({ tailBytes: 256, readyLine: '' })
    output.write('x'.repeat(300))
    output.write('end\n')
    expect(tty.text()).toHaveLength(256)
    expect(tty.text().endsWith('end\n')).toBe(true)
  })

  it('resolves `ready` at the ready line, even split across chunks', async () => {
    const { output, console: tty } = makeConsole()
    output.write('booting\nvmcgi: re')
    expect(tty.readyMs).toBeUndefined()
    output.write('ady\n')
    await tty.ready
    expect(tty.readyMs).toBeGreaterThanOrEqual(0)
  })

  it('resolves with the first of the awaited texts to show, or one shown already', async () => {
    const { output, console: tty } = makeConsole()
    const waiting = tty.waitFor(['done 1', 'failed 1'], AbortSignal.timeout(5_000))
    output.write('failed 1\ndone 1\n')
    await expect(waiting).resolves.toBe('failed 1')
    await expect(tty.waitFor(['done 1'], AbortSignal.timeout(5_000))).resolves.toBe('done 1')
  })

  it('rejects with the signal\'s reason when it aborts first', async () => {
    const { console: tty } = makeConsole()
    const abort = new AbortController()
    const waiting = tty.waitFor(['never'], abort.signal)
    abort.abort(new Error('boot deadline'))
    await expect(waiting).rejects.toThrow('boot deadline')
  })
})
