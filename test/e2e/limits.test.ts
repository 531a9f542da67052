// vmcgi at its descriptor limit: the real CLI under prlimit, idle client connections holding descriptors, the test guest in real QEMU.

import { connect, type Socket } from 'node:net'
import { Client, request } from 'undici'
import { describe, expect, it, onTestFinished } from 'vitest'
import { fdCount } from '../support/proc.js'
import { spawnVmcgi, type VmcgiProcess } from '../support/vmcgi.js'
import { testImage, writeConfig } from './harness.js'

const openFiles = 256

/** Starts vmcgi on the test guest with at most `openFiles` descriptors; stopped, and its QEMUs checked gone, when the test ends. */
async function startLimited(limits: Record<string, unknown> = {}): Promise<VmcgiProcess> {
  const vmcgi = await spawnVmcgi(writeConfig({ limits, log: { level: 'info' } }, testImage()), { openFiles })
  onTestFinished(async () => {
    expect(await vmcgi.stop()).toEqual([])
  })
  return vmcgi
}

/** One connection, proven accepted by an answer to /up, that later requests reuse. */
async function keptConnection(vmcgi: VmcgiProcess): Promise<Client> {
  const client = new Client(vmcgi.url, { pipelining: 1, keepAliveTimeout: 60_000, keepAliveMaxTimeout: 60_000 })
  onTestFinished(() => client.destroy())
  const up = await client.request({ method: 'GET', path: '/up' })
  expect(up.statusCode).toBe(200)
  await up.body.text()
  return client
}

/** Opens `count` connections that send nothing; they are closed when the test ends. */
async function idleConnections(vmcgi: VmcgiProcess, count: number): Promise<Socket[]> {
  const port = Number(new URL(vmcgi.url).port)
  const sockets = await Promise.all(Array.from({ length: count }, () => new Promise<Socket>((resolve) => {
    const socket = connect({ host: '127.0.0.1', port })
    socket.on('error', () => {})
    socket.once('connect', () => resolve(socket))
    socket.once('close', () => resolve(socket))
  })))
  onTestFinished(() => sockets.forEach((socket) => socket.destroy()))
  return sockets
}

async function get(target: Client | string, path: string) {
  const res = typeof target === 'string' ? await request(`${target}${path}`) : await target.request({ method: 'GET', path })
  const body = await res.body.text()
  return { status: res.statusCode, vmcgiStatus: res.headers['vmcgi-status'], body }
}

describe('at the descriptor limit', () => {
  it('answers 502 spawn-failed when no descriptor is left for a VM, stays up, and serves again once they are free', async () => {
    // A cap above what the descriptors allow: idle clients can take them all.
    const vmcgi = await startLimited({ connections: 100_000 })
    const pid = vmcgi.child.pid!
    const kept = await keptConnection(vmcgi)
    const idle = await idleConnections(vmcgi, openFiles)
    await expect.poll(() => fdCount(pid), { timeout: 5_000 }).toBeGreaterThanOrEqual(openFiles - 1)

    const starved = await get(kept, '/cgi-bin/id')
    expect(starved.status).toBe(502)
    expect(starved.vmcgiStatus).toBe('spawn-failed')

    idle.forEach((socket) => socket.destroy())
    await expect.poll(() => fdCount(pid), { timeout: 5_000 }).toBeLessThan(openFiles / 2)
    expect(vmcgi.child.exitCode).toBeNull()
    expect(await get(vmcgi.url, '/up')).toMatchObject({ status: 200, body: 'OK\n' })
    expect(await get(vmcgi.url, '/cgi-bin/id')).toMatchObject({ status: 200, vmcgiStatus: 'OK' })
  })

  it('by default accepts no more connections than leave the VMs their descriptors, so that a request on one still boots its VM', async () => {
    // limits.connections: 256 - 32 for vmcgi's own - 48 for each of 2 VMs = 128.
    const vmcgi = await startLimited({ maxVms: 2 })
    const pid = vmcgi.child.pid!
    const kept = await keptConnection(vmcgi)
    const idle = await idleConnections(vmcgi, openFiles)
    // Those past limits.connections are closed as soon as they are accepted.
    await expect.poll(() => idle.filter((socket) => socket.closed).length, { timeout: 5_000 }).toBe(openFiles - 127)
    expect(vmcgi.logLines().filter((line) => line.msg === 'connection dropped: limits.connections reached')).toHaveLength(openFiles - 127)

    expect(await get(kept, '/cgi-bin/id')).toMatchObject({ status: 200, vmcgiStatus: 'OK' })
    idle.forEach((socket) => socket.destroy())
    await expect.poll(() => fdCount(pid), { timeout: 5_000 }).toBeLessThan(64)
    expect(await get(vmcgi.url, '/up')).toMatchObject({ status: 200 })
  })
})
