// What a VM's sockets do when this process has no descriptor left: readiness probes and the connection into the guest fail plainly, nothing crashes.

import { closeSync, openSync } from 'node:fs'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Agent, request } from 'undici'
import { describe, expect, it, onTestFinished } from 'vitest'
import { guestFailure } from '../../../src/proxy.js'
import { waitUntilReady } from '../../../src/vm/readiness.js'

/** Opens /dev/null until no descriptor is left; closed again when the test ends, or before by the function returned. */
function exhaustDescriptors(): () => void {
  const held: number[] = []
  const release = () => held.splice(0).forEach((fd) => closeSync(fd))
  onTestFinished(release)
  try {
    for (;;) held.push(openSync('/dev/null', 'r'))
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EMFILE') throw error
  }
  return release
}

/** A guest stand-in that answers every request. */
async function answeringPort(): Promise<number> {
  const server = createServer((_request, response) => response.end('ok'))
  onTestFinished(() => new Promise<void>((resolve) => server.close(() => resolve())))
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return (server.address() as AddressInfo).port
}

describe('with no descriptor left', () => {
  it('readiness probes that cannot open a socket end at the caller\'s deadline, with its reason', async () => {
    const port = await answeringPort()
    const deadline = AbortSignal.timeout(200)
    exhaustDescriptors()
    await expect(waitUntilReady({ host: '127.0.0.1', port, path: '/', intervalMs: 10, attemptTimeoutMs: 100, signal: deadline }))
      .rejects.toMatchObject({ name: 'TimeoutError' })
  })

  it('the connection into the guest that cannot be opened is guest-unreachable', async () => {
    const port = await answeringPort()
    const agent = new Agent()
    onTestFinished(() => agent.close())
    const release = exhaustDescriptors()
    const error = await request(`http://127.0.0.1:${port}/`, { dispatcher: agent }).then(() => undefined, (reason: Error) => reason)
    release()
    expect(error).toMatchObject({ code: 'EMFILE' })
    expect(guestFailure(error!)).toMatchObject({ code: 'GUEST_UNREACHABLE', statusCode: 502 })
  })
})
