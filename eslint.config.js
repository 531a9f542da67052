// Lint rules for vmcgi: the recommended sets of ESLint and typescript-eslint,
// with Node's globals and the one exception below. Formatting is not checked.

import js from '@eslint/js'
import { defineConfig } from 'eslint/config'
import globals from 'globals'
import tseslint from 'typescript-eslint'

export default defineConfig(
  { ignores: ['dist/', 'build/', 'node_modules/', 'images/out/', 'bench/out/'] },
  js.configs.recommended,
  tseslint.configs.recommended,
  {
    // Everything here runs on Node (the plain .js files too: test fixtures, this config).
    languageOptions: { globals: globals.node },
    rules: {
      // A leading underscore marks a parameter that a callback's signature requires but the body does not use.
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
)
