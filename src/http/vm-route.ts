// The route every request but the health check takes: a lease on a fresh VM,
// then the request forwarded into it.

import { METHODS } from 'node:http'
import fp from 'fastify-plugin'
import type { VmLeases } from '../lease.js'
import { forwardToVm } from '../proxy.js'
import { guestPath, requestHost } from './request-target.js'

export const vmRoute = fp<{ leases: VmLeases }>(async (app, { leases }) => {
  // Every method Node can parse goes to the guest (WebDAV's PROPFIND, say),
  // except CONNECT: vmcgi is no tunnel.
  for (const method of METHODS) {
    if (method !== 'CONNECT' && !app.supportedMethods.includes(method)) app.addHttpMethod(method, { hasBody: true })
  }
  app.all('/*', async (request, reply) => {
    const exchange = request.exchange!
    // What cannot be forwarded as it came is refused before any VM boots.
    const target = { path: guestPath(request.url), host: requestHost(request.raw.rawHeaders, request.raw.httpVersion) }
    const lease = await leases.take(request.log, exchange.signal)
    exchange.hold(lease)
    return forwardToVm(request, reply, exchange, lease, target)
  })
}, { name: 'vmcgi-vm-route', dependencies: ['vmcgi-exchange'] })
