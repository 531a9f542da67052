import { EventEmitter } from 'node:events'
import type { ServerResponse } from 'node:http'
import { describe, expect, it, onTestFinished } from 'vitest'
import { VmcgiError } from '../../../src/errors.js'
import { Exchange } from '../../../src/http/exchange.js'
import { Lease } from '../../../src/lease.js'
import { FakeVm } from '../../helpers/fake-vm.js'

/** The part of a ServerResponse an Exchange looks at. */
class FakeResponse extends EventEmitter {
  headersSent = false
  writableFinished = false
  destroyed = false

  destroy(): void {
    this.destroyed = true
    this.emit('close')
  }

  finish(): void {
    this.writableFinished = true
    this.emit('close')
  }
}

function exchange(requestMs = 60_000) {
  const response = new FakeResponse()
  const made = new Exchange(response as unknown as ServerResponse, requestMs)
  onTestFinished(() => void response.emit('close'))
  return { exchange: made, response }
}

async function bootedLease() {
  const vm = new FakeVm('ok', (_req, res) => res.end())
  await vm.boot(new AbortController().signal)
  const released: string[] = []
  const lease = new Lease(vm, { queueMs: 0, waitMs: 0 }, () => released.push(vm.state))
  return { vm, lease, released }
}

describe('Exchange', () => {
  it('keeps the first failure, and explains a guest error by it', () => {
    const { exchange: made } = exchange()
    const first = made.fail(new VmcgiError('BODY_TIMEOUT', 'first'))
    expect(made.fail(new VmcgiError('VM_EXITED', 'second'))).toBe(first)
    expect(made.explain(Object.assign(new Error('reset'), { code: 'ECONNRESET' }))).toBe(first)
    expect(made.failure?.code).toBe('BODY_TIMEOUT')
  })

  it('explains a guest error by what the guest did when nothing came first', () => {
    const { exchange: made } = exchange()
    expect(made.explain(Object.assign(new Error('reset'), { code: 'ECONNRESET' })).code).toBe('GUEST_UNREACHABLE')
  })

  it('aborts its signal with request-timeout when the deadline passes', async () => {
    const { exchange: made } = exchange(50)
    await new Promise((resolve) => made.signal.addEventListener('abort', resolve))
    expect(made.signal.reason).toMatchObject({ code: 'REQUEST_TIMEOUT' })
    expect(made.failure?.code).toBe('REQUEST_TIMEOUT')
  })

  it('blames the client when the deadline passes while its body is read', async () => {
    const { exchange: made } = exchange(50)
    const read = made.readBody((signal) => new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason))))
    await expect(read).rejects.toMatchObject({ code: 'CLIENT_TIMEOUT' })
    expect(made.failure?.code).toBe('CLIENT_TIMEOUT')
  })

  it('cuts a response after its headers instead of letting it end cleanly', () => {
    const { exchange: made, response } = exchange()
    response.headersSent = true
    made.fail(new VmcgiError('BODY_TIMEOUT', 'the guest stopped'))
    expect(response.destroyed).toBe(true)
  })

  it('records client-gone when the response closes unfinished, before its close listeners run, and ends its lease', async () => {
    const { exchange: made, response } = exchange()
    const { vm, lease, released } = await bootedLease()
    made.hold(lease)
    const seen: Array<string | undefined> = []
    made.onClosed(() => seen.push(made.failure?.code))
    response.emit('close')
    expect(seen).toEqual(['CLIENT_GONE'])
    expect(made.signal.reason).toMatchObject({ code: 'CLIENT_GONE' })
    await vm.ended
    await lease.end()
    expect(released).toEqual(['stopped'])
  })

  it('records nothing for a response that finished, and still ends its lease', async () => {
    const { exchange: made, response } = exchange()
    const { lease, released } = await bootedLease()
    made.hold(lease)
    response.finish()
    await lease.end()
    expect(made.failure).toBeUndefined()
    expect(made.signal.aborted).toBe(false)
    expect(released).toEqual(['stopped'])
  })

  it('ends a lease it is handed after the request is over', async () => {
    const { exchange: made, response } = exchange()
    response.emit('close')
    const { vm, lease } = await bootedLease()
    made.hold(lease)
    expect(lease.ended).toBe(true)
    await vm.ended
  })

  it('cuts the response when QEMU exits mid-body', async () => {
    const { exchange: made, response } = exchange()
    const { vm, lease } = await bootedLease()
    made.hold(lease)
    response.headersSent = true
    await vm.destroy(new Error('killed by the test'))
    await expect.poll(() => response.destroyed).toBe(true)
    expect(made.failure?.code).toBe('VM_EXITED')
  })
})
