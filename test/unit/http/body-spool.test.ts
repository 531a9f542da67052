import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { text } from 'node:stream/consumers'
import { describe, expect, it, onTestFinished } from 'vitest'
import { SpooledBody, SpoolFolder } from '../../../src/http/body-spool.js'

function folder() {
  const parent = mkdtempSync(join(tmpdir(), 'vmcgi-spool-test-'))
  onTestFinished(() => rmSync(parent, { recursive: true, force: true }))
  const files = () => readdirSync(parent).flatMap((dir) => readdirSync(join(parent, dir)))
  return { spool: new SpoolFolder(parent), files, parent }
}

describe('SpooledBody', () => {
  it('keeps a body within its memory size in memory', async () => {
    const { spool, files } = folder()
    const body = new SpooledBody(10, spool)
    await body.append(Buffer.from('hello '))
    await body.append(Buffer.from('you'))
    expect(body.spooled).toBe(false)
    expect(files()).toEqual([])
    expect(await text(await body.open())).toBe('hello you')
  })

  it('moves a larger body to a private file, gives it back whole, and removes the file', async () => {
    const { spool, files, parent } = folder()
    const body = new SpooledBody(10, spool)
    for (const part of ['0123456789', 'abcdef', 'ghij']) await body.append(Buffer.from(part))
    expect(body.spooled).toBe(true)
    expect(body.length).toBe(20)
    expect(files()).toHaveLength(1)
    expect(await text(await body.open())).toBe('0123456789abcdefghij')
    body.dispose()
    await expect.poll(files).toEqual([])
    spool.removeAll()
    expect(readdirSync(parent)).toEqual([])
  })
})
