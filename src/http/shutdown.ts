// Shutdown: once vmcgi is closing, requests still arriving on kept-alive
// connections get 503 shutting-down and `connection: close`; closeGracefully
// drains the requests in flight for a while, then kills what is left.

import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { VmcgiError } from '../errors.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Stops accepting, lets requests in flight finish for up to `drainMs`, then kills their VMs and connections. */
    closeGracefully(drainMs: number): Promise<void>
  }
}

export interface ShutdownOptions {
  /** Kills every VM now; requests in flight on them fail. */
  destroyAllVms: () => Promise<void>
}

export const shutdown = fp<ShutdownOptions>(async (app, { destroyAllVms }) => {
  let closing = false
  app.addHook('preClose', async () => {
    closing = true
  })
  app.addHook('onRequest', async () => {
    if (closing) throw new VmcgiError('SHUTTING_DOWN', 'vmcgi is shutting down')
  })
  // Every answer from now on, the refusals above included.
  app.addHook('onSend', async (_request, reply) => {
    if (closing) reply.header('connection', 'close')
  })
  app.decorate('closeGracefully', async function (this: FastifyInstance, drainMs: number) {
    const force = setTimeout(() => {
      this.log.warn({ drainMs }, 'drain timeout: killing the VMs still serving')
      void destroyAllVms()
      this.server.closeAllConnections()
    }, drainMs)
    try {
      await this.close()
    } finally {
      clearTimeout(force)
    }
  })
}, { name: 'vmcgi-shutdown' })
